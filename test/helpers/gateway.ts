import Fastify, { type FastifyInstance } from 'fastify'
import type { Test } from 'tap'
import { monitorEventLoopDelay } from 'node:perf_hooks'
import { scrape } from './prometheus.js'
import maestro, { type MaestroOptions } from '../../app.js'
import { createTestDatabase, seedInventory, type FleetSpec, type TestDatabase } from './database.js'
import { Redis } from 'ioredis'
import { REDIS_URL, testPrefix } from './redis.js'
import { GpuRecorder, startDiffusionSimulator, startSimulator, startSpeechSimulator, type Simulator, type SimulatorOptions } from './upstream-simulator.js'

export interface Gateway {
  app: FastifyInstance
  /** http://127.0.0.1:PORT */
  url: string
  close: () => Promise<void>
}

/**
 * One gateway replica listening on a random port, its options as plugin options (which win over
 * the environment and `.env`). Closed at the end of the test.
 */
export async function startGateway (t: Pick<Test, 'teardown'>, options: MaestroOptions = {}, opts: { logLines?: string[] } = {}): Promise<Gateway> {
  const lines = opts.logLines
  const logger = lines != null
    ? { level: 'debug', stream: { write: (line: string) => { lines.push(line) } } }
    : process.env.TEST_LOG != null ? { level: process.env.TEST_LOG } : false
  // Tests close gateways at once: an aborted client fetch leaves a spare idle connection behind.
  const app = Fastify({ logger, forceCloseConnections: true })
  await app.register(maestro, { dotenv: false, ...options })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const address = app.server.address()
  const port = typeof address === 'object' && address != null ? address.port : 0
  let closed = false
  const close = async (): Promise<void> => {
    if (closed) return
    closed = true
    await app.close()
  }
  t.teardown(close)
  return { app, url: `http://127.0.0.1:${port}`, close }
}

/**
 * Call before a load and the function it returns after it, beside the overlap check: it tells
 * whether GPUs found shared were a replica's lease given up (not renewed in time, or found taken:
 * the process stalled near the ttl, which the event-loop delay shows) or a double grant.
 */
export function watchLeases (t: Pick<Test, 'comment' | 'same'>, replicas: Gateway[]): () => Promise<void> {
  const delay = monitorEventLoopDelay({ resolution: 10 })
  delay.enable()
  return async () => {
    delay.disable()
    const lost = await Promise.all(replicas.map(async (r) => {
      const metrics = await scrape(r.url)
      return metrics.find('maestro_lease_expiries_total').reduce((n, s) => n + s.value, 0)
    }))
    t.comment(`event loop delay: max ${Math.round(delay.max / 1e6)} ms, p99 ${Math.round(delay.percentile(99) / 1e6)} ms`)
    t.same(lost, replicas.map(() => 0), 'no replica lost a lease (not renewed in time, or found taken)')
  }
}

export interface UpstreamSpec {
  /** model served (as stored in `assignments.model_name`) */
  model: string
  kind?: 'llm' | 'diffusor' | 'speech'
  /** indexes into the fleet's GPU list (0-based) */
  gpus: number[]
  name?: string
  simulator?: SimulatorOptions
}

export interface TestFleet {
  db: TestDatabase
  /** the key prefix shared by every replica of this fleet */
  prefix: string
  recorder: GpuRecorder
  /** one simulator per upstream spec, in order */
  upstreams: Simulator[]
  /** GPU ids as stored */
  gpuIds: string[]
  /** gateway options that point a replica at this fleet's database and Redis */
  options: MaestroOptions
  /** GPU ids that hold a lease right now, read straight from Redis */
  heldGpus: () => Promise<string[]>
  /** start one more replica of the gateway on this fleet (its log lines into `logLines` when given) */
  replica: (options?: MaestroOptions, opts?: { logLines?: string[] }) => Promise<Gateway>
}

/**
 * A real fleet for a test: a fresh MariaDB database in the original schema holding `gpus` GPUs
 * (weights by index, default 1) and one assignment per upstream, each pointing at its own
 * simulator on 127.0.0.1, every simulator recording GPU use on one shared recorder.
 */
export async function startFleet (t: Pick<Test, 'teardown'>, spec: {
  gpus: Array<number | null>
  upstreams: UpstreamSpec[]
  migrate?: boolean
  options?: MaestroOptions
}): Promise<TestFleet> {
  const db = await createTestDatabase(t, { migrate: spec.migrate })
  const prefix = testPrefix(t)
  const recorder = new GpuRecorder()
  const seededGpus = await seedInventory(db.query, { gpus: spec.gpus.map((weight) => ({ weight })) })
  const gpuIds = seededGpus.gpus.map(String)
  const upstreams: Simulator[] = []
  for (const u of spec.upstreams) {
    const ids = u.gpus.map((i) => gpuIds[i])
    const options = { ...u.simulator, gpuIds: ids, recorder, models: u.simulator?.models ?? [u.model] }
    const sim = u.kind === 'diffusor'
      ? await startDiffusionSimulator(options)
      : u.kind === 'speech' ? await startSpeechSimulator(options) : await startSimulator(options)
    t.teardown(() => sim.close())
    upstreams.push(sim)
  }
  const llms = [...new Set(spec.upstreams.filter((u) => u.kind == null || u.kind === 'llm').map((u) => u.model))]
  const diffusors = [...new Set(spec.upstreams.filter((u) => u.kind === 'diffusor').map((u) => u.model))]
  await seedInventory(db.query, {
    computers: [],
    llms,
    diffusors,
    speech: [...new Set(spec.upstreams.filter((u) => u.kind === 'speech').map((u) => u.model))],
    assignments: spec.upstreams.map((u, i) => ({
      name: u.name ?? `${u.model}-${i + 1}`,
      model: u.model,
      port: upstreams[i].port,
      gpus: u.gpus.map((g) => seededGpus.gpus[g])
    }))
  })
  const options: MaestroOptions = {
    MARIADB_URL: db.url,
    REDIS_URL,
    REDIS_KEY_PREFIX: prefix,
    ...spec.options
  }
  return {
    db,
    prefix,
    recorder,
    upstreams,
    gpuIds,
    options,
    heldGpus: async () => await heldGpus(prefix),
    replica: async (extra = {}, opts = {}) => await startGateway(t, { ...options, ...extra }, opts)
  }
}

async function heldGpus (prefix: string): Promise<string[]> {
  const client = new Redis(REDIS_URL)
  try {
    const keys = await client.keys(prefix.replace(/[*?[\]\\]/g, '\\$&') + 'gpu:*')
    return keys.map((k) => k.slice(prefix.length + 'gpu:'.length)).sort()
  } finally {
    client.disconnect()
  }
}

/**
 * Checks through `GET /gpu/status` that the fleet is at rest: no GPU leased, nobody waiting, no
 * GPU held for a waiter. Releases run just after a response ends, so it looks again for up to
 * a second before it reports what it saw.
 */
export async function assertAllFree (t: Pick<Test, 'same'>, gw: Pick<Gateway, 'url'>): Promise<void> {
  const deadline = performance.now() + 1000
  let status: { gpus: Array<{ id: string, leased: boolean }>, waiting: unknown[], holds: unknown[] }
  for (;;) {
    const res = await fetch(`${gw.url}/gpu/status`)
    if (res.status !== 200) throw new Error(`GET /gpu/status answered ${res.status}: ${await res.text()}`)
    status = await res.json() as typeof status
    const free = status.gpus.every((g) => !g.leased) && status.waiting.length === 0 && status.holds.length === 0
    if (free || performance.now() > deadline) break
    await new Promise((resolve) => setTimeout(resolve, 25))
  }
  t.same({
    leased: status.gpus.filter((g) => g.leased),
    waiting: status.waiting,
    holds: status.holds
  }, { leased: [], waiting: [], holds: [] }, 'every GPU free, nobody waiting')
}
