/**
 * `npm run bench`: the gateway's overhead, measured against the same simulators reached directly.
 *
 * Processes (2 cores on the reference machine, all competing for them):
 *   this one       the load generator (closed-loop node:http clients with keep-alive)
 *   simulators     one child process holding 64 Ollama simulators, one GPU each, one model each
 *   gateway        `node dist/server.js` as a child process, as it is deployed: Redis leases,
 *                  inventory from a file (the inventory is cached and not on the request path)
 *   redis-server   the one at REDIS_URL, under a key prefix of its own, deleted afterwards
 *
 *   nginx          a plain reverse proxy to the same simulators (one worker), the yardstick
 *   floors         what stands in the gateway's way, measured beside it in (a), (b), (c): the same
 *                  gateway with its leases in process memory (one replica, no Redis round trip),
 *                  and Fastify + reply-from alone (bench/bare-proxy.ts: the fixed stack, nothing else)
 *
 * Scenarios: (a) 64 GPUs and 64 clients, direct vs nginx vs gateway; (b) one GPU with 16 clients waiting
 * (GPU idle gap between requests, fairness against strict FIFO); (c) one client (added latency);
 * (d) the lease engine with 2,048 candidates (4 free) vs 64; (e) one GPU with 1,000 waiters vs 16,
 * and 1,000 waiters in 1,000 queues vs one queue (the engine alone, in this process); (f) a
 * capacity-4 server (OLLAMA_NUM_PARALLEL 4) with 16 clients, gateway vs direct;
 * `events` (only when asked for, `--only events`): (a)'s load with and without 200 open
 * `GET /gpu/events` streams (200 console pages), whose cost must stay within 5 % of throughput.
 *
 * Options: --seconds N (measured window per run, default 4), --only a,b,c, --log-level L (the
 * gateway's LOG_LEVEL, default info as deployed), --profile DIR (write the gateway's .cpuprofile),
 * --gateway-node-options "FLAGS" (node flags for the gateway process only), --trace (time the
 * steps of a request at one client (c) and of a handover on one GPU (b) inside the gateway:
 * bench/trace.ts).
 */
import { fork, spawn, execFileSync, type ChildProcess } from 'node:child_process'
import http from 'node:http'
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises'
import { createServer } from 'node:net'
import { tmpdir, loadavg, cpus } from 'node:os'
import { join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'
import { parseArgs } from 'node:util'
import { randomUUID } from 'node:crypto'
import { Redis } from 'ioredis'
import { WIDE_TOKEN_MS, WIDE_TOKENS, benchGpuId, benchModel, inventoryFile, type SimulatorCommand, type SimulatorReply } from './fleet.js'
import { closedLoop, mean, percentile, sleep, type LoadResult, type Target } from './load.js'
import { handoffRate, type EngineCase } from './engine.js'
import { startNginx, stopNginx } from './nginx.js'
import type { TraceSummary } from './trace.js'

const GPUS = 64
const WAITERS = 16
const WARMUP_MS = 3000
const GOALS = { nginxRatio: 0.35, gapP50Ms: 0.3, gapP99Ms: 1.5, fifoRatio: 2, addedP50Ms: 0.4, costRatio: 0.8, capacityRatio: 0.9, eventStreamsRatio: 0.95 }
const EVENT_STREAMS = 200
/** (f): the capacity-4 server's model and GPU, after the 64 single-GPU ones */
const WIDE = GPUS

const { values: args } = parseArgs({
  options: {
    seconds: { type: 'string', default: '4' },
    only: { type: 'string', default: 'a,b,c,d,e,f' },
    'log-level': { type: 'string', default: 'info' },
    profile: { type: 'string' },
    'gateway-node-options': { type: 'string', default: '' },
    trace: { type: 'boolean', default: false }
  }
})
const windowMs = Math.round(Number(args.seconds) * 1000)
const only = new Set(args.only.split(','))
const redisUrl = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379'
const prefix = `maestro-bench:${randomUUID().slice(0, 8)}:`
const here = fileURLToPath(new URL('.', import.meta.url))

// ---------------------------------------------------------------------------------------------
// processes and their CPU time

const CLOCK_TICKS = (() => {
  try { return Number(execFileSync('getconf', ['CLK_TCK']).toString().trim()) || 100 } catch { return 100 }
})()

/** CPU time (user + system) of a process so far, ms; undefined where /proc cannot tell. */
async function cpuMs (pid: number | undefined): Promise<number | undefined> {
  if (pid === undefined) return undefined
  if (pid === process.pid) {
    const u = process.cpuUsage()
    return (u.user + u.system) / 1000
  }
  try {
    const stat = await readFile(`/proc/${pid}/stat`, 'utf8')
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
    return (Number(fields[11]) + Number(fields[12])) / CLOCK_TICKS * 1000
  } catch {
    return undefined
  }
}

/** CPU time of a process and its children (nginx's master and its workers), ms. */
async function treeCpuMs (pid: number | undefined): Promise<number | undefined> {
  const own = await cpuMs(pid)
  if (own === undefined || pid === process.pid) return own
  let children: number[] = []
  try {
    children = (await readFile(`/proc/${pid}/task/${pid}/children`, 'utf8')).trim().split(/\s+/).filter(Boolean).map(Number)
  } catch {}
  let total = own
  for (const child of children) total += await cpuMs(child) ?? 0
  return total
}

/** CPU time the whole machine spent busy so far, ms (all cores); undefined off Linux. */
async function machineBusyMs (): Promise<number | undefined> {
  try {
    const line = (await readFile('/proc/stat', 'utf8')).split('\n')[0]
    const [user, nice, system, , , irq, softirq, steal] = line.trim().split(/\s+/).slice(1).map(Number)
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS * 1000
  } catch {
    return undefined
  }
}

type Role = 'clients' | 'simulators' | 'gateway' | 'redis' | 'nginx' | 'memory' | 'bare'
/** CPU use in percent of one core: the benchmark's processes, and everything else on the machine. */
type CpuShare = Partial<Record<Role | 'others', number>>
const pids: Partial<Record<Role, number>> = { clients: process.pid }

/** Share of one core each process used between two samples, percent. */
class CpuMeter {
  private readonly start = new Map<Role, number | undefined>()
  private machineStart: number | undefined
  private startedAt = 0
  async begin (): Promise<void> {
    this.startedAt = performance.now()
    this.machineStart = await machineBusyMs()
    for (const role of Object.keys(pids) as Role[]) this.start.set(role, await treeCpuMs(pids[role]))
  }

  async end (): Promise<CpuShare> {
    const wall = performance.now() - this.startedAt
    const out: CpuShare = {}
    let ours = 0
    for (const role of Object.keys(pids) as Role[]) {
      const a = this.start.get(role)
      const b = await treeCpuMs(pids[role])
      if (a !== undefined && b !== undefined) {
        out[role] = Math.round((b - a) / wall * 100)
        ours += b - a
      }
    }
    const machineEnd = await machineBusyMs()
    if (this.machineStart !== undefined && machineEnd !== undefined) {
      out.others = Math.max(0, Math.round((machineEnd - this.machineStart - ours) / wall * 100))
    }
    return out
  }
}

async function freePort (): Promise<number> {
  return await new Promise((resolve, reject) => {
    const server = createServer()
    server.once('error', reject)
    server.listen(0, '127.0.0.1', () => {
      const address = server.address()
      const port = typeof address === 'object' && address != null ? address.port : 0
      server.close(() => resolve(port))
    })
  })
}

class SimulatorProcess {
  private readonly replies: Array<(reply: SimulatorReply) => void> = []
  private constructor (readonly child: ChildProcess, readonly ports: number[]) {
    child.on('message', (reply: SimulatorReply) => this.replies.shift()?.(reply))
  }

  static async start (count: number): Promise<SimulatorProcess> {
    const child = fork(join(here, 'simulator-process.js'), [String(count)], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] })
    const ports = await new Promise<number[]>((resolve, reject) => {
      child.once('message', (reply: SimulatorReply) => { if (reply.type === 'ready') resolve(reply.ports) })
      child.once('exit', (code) => reject(new Error(`simulator process exited (${code})`)))
    })
    return new SimulatorProcess(child, ports)
  }

  async ask<T extends SimulatorReply['type']> (command: SimulatorCommand): Promise<Extract<SimulatorReply, { type: T }>> {
    return await new Promise((resolve) => {
      this.replies.push(resolve as (reply: SimulatorReply) => void)
      this.child.send(command)
    })
  }

  async close (): Promise<void> {
    const exited = new Promise((resolve) => this.child.once('exit', resolve))
    this.child.send({ type: 'close' } satisfies SimulatorCommand)
    await exited
  }
}

/** Bytes the gateway has logged so far. */
let logBytes = 0

/**
 * What is measured in the gateway's place: the gateway as deployed (leases in Redis), the same
 * gateway with its leases in process memory (`LEASE_STORE=memory`, no Redis at all), or the bare
 * stack (bench/bare-proxy.ts). Only the first gets --profile, --trace and --gateway-node-options,
 * and only its log is counted.
 */
type ProxyKind = 'gateway' | 'memory' | 'bare'

async function startGateway (dir: string, ports: number[], kind: ProxyKind = 'gateway'): Promise<{ child: ChildProcess, url: string }> {
  const inventory = join(dir, 'inventory.json')
  await writeFile(inventory, JSON.stringify(inventoryFile(ports)))
  const port = await freePort()
  const env: NodeJS.ProcessEnv = { ...process.env }
  for (const name of ['MARIADB_URL', 'ConnectionStrings__MariaDb', 'ConnectionStrings__Redis', 'API_KEYS', 'ADMIN_TOKEN']) delete env[name]
  Object.assign(env, {
    NODE_ENV: 'production',
    HOST: '127.0.0.1',
    PORT: String(port),
    REDIS_URL: redisUrl,
    REDIS_KEY_PREFIX: prefix,
    INVENTORY_FILE: inventory,
    LOG_LEVEL: args['log-level']
  })
  if (kind === 'memory') {
    env.LEASE_STORE = 'memory'
    delete env.REDIS_URL
  }
  const flags = kind === 'gateway' ? args['gateway-node-options'].split(' ').filter(Boolean) : []
  if (args.profile != null && kind === 'gateway') flags.push('--cpu-prof', '--cpu-prof-dir', resolve(args.profile))
  if (args.trace && kind === 'gateway') {
    flags.push(`--import=${join(here, 'trace.js')}`)
    env.MAESTRO_TRACE_FILE = join(dir, 'trace.json')
  }
  // cwd: an empty folder, so that no `.env` of the working tree changes what is measured.
  // stdout: a pipe, as under a container runtime; its log lines are counted, not kept.
  const script = kind === 'bare' ? join(here, 'bare-proxy.js') : join(here, '..', 'server.js')
  const child = spawn(process.execPath, [...flags, script], { cwd: dir, env, stdio: ['ignore', 'pipe', 'pipe'] })
  if (kind === 'gateway') child.stdout?.on('data', (chunk: Buffer) => { logBytes += chunk.length })
  else child.stdout?.resume()
  // however this process ends, the gateway does not outlive it
  process.once('exit', () => child.kill('SIGKILL'))
  let stderr = ''
  child.stderr?.on('data', (chunk: Buffer) => { stderr += chunk.toString() })
  const url = `http://127.0.0.1:${port}`
  const deadline = Date.now() + 20_000
  for (;;) {
    if (child.exitCode != null) throw new Error(`the ${kind} proxy exited at start: ${stderr.trim()}`)
    const ok = await fetch(`${url}/health`).then((r) => r.ok, () => false)
    if (ok) break
    if (Date.now() > deadline) throw new Error(`the ${kind} proxy did not answer /health within 20 s: ${stderr.trim()}`)
    await sleep(100)
  }
  return { child, url }
}

async function stopGateway (child: ChildProcess): Promise<void> {
  if (child.exitCode != null) return
  const exited = new Promise((resolve) => child.once('exit', resolve))
  child.kill('SIGTERM')
  await exited
}

async function deleteKeys (): Promise<void> {
  const client = new Redis(redisUrl, { lazyConnect: true, maxRetriesPerRequest: 1 })
  try {
    await client.connect()
    let cursor = '0'
    do {
      const [next, keys] = await client.scan(cursor, 'MATCH', prefix + '*', 'COUNT', 500)
      cursor = next
      if (keys.length > 0) await client.del(...keys)
    } while (cursor !== '0')
  } finally {
    client.disconnect()
  }
}

async function redisPid (): Promise<number | undefined> {
  const client = new Redis(redisUrl, { lazyConnect: true, maxRetriesPerRequest: 0, connectTimeout: 2000 })
  try {
    await client.connect()
    const info = await client.info('server')
    const pid = Number(/process_id:(\d+)/.exec(info)?.[1])
    return Number.isFinite(pid) && pid > 0 ? pid : undefined
  } catch (err) {
    throw new Error(`Redis at ${redisUrl} is not reachable (${(err as Error).message}); the benchmark measures the Redis lease path`)
  } finally {
    client.disconnect()
  }
}

// ---------------------------------------------------------------------------------------------
// scenarios

const generate = (url: string, i: number): Target => ({
  url: new URL(url + '/api/generate'),
  body: JSON.stringify({ model: benchModel(i), prompt: 'Why is the sky blue?', stream: false })
})

interface Run extends LoadResult {
  cpu: CpuShare
  logBytesPerRequest: number
  redis: ScriptWork
}

/** The lease scripts' work in Redis over a window (INFO commandstats, read before and after). */
interface ScriptWork {
  /** EVALSHA calls */
  scripts: number
  /** their time in Redis, µs (the scripts' own, without the network) */
  scriptUs: number
  /** the Redis commands those scripts ran (every other command counted, bar INFO itself) */
  innerCalls: number
}

let statsClient: Redis | undefined

async function scriptWork (): Promise<ScriptWork> {
  statsClient ??= new Redis(redisUrl, { maxRetriesPerRequest: 1 })
  const info = await statsClient.info('commandstats')
  const out: ScriptWork = { scripts: 0, scriptUs: 0, innerCalls: 0 }
  for (const m of info.matchAll(/^cmdstat_([a-z_|]+):calls=(\d+),usec=(\d+)/gm)) {
    if (m[1] === 'evalsha') {
      out.scripts += Number(m[2])
      out.scriptUs += Number(m[3])
    } else if (m[1] !== 'info') {
      out.innerCalls += Number(m[2])
    }
  }
  return out
}

const workSince = (a: ScriptWork, b: ScriptWork): ScriptWork =>
  ({ scripts: b.scripts - a.scripts, scriptUs: b.scriptUs - a.scriptUs, innerCalls: b.innerCalls - a.innerCalls })

/** Per request: scripts, µs per script, Redis calls per script. */
const scriptText = (w: ScriptWork, requests: number): string =>
  `Redis ${fmt(w.scripts / requests, 1)} scripts per request, ${fmt(w.scriptUs / w.scripts, 0)} µs and ${fmt(w.innerCalls / w.scripts, 1)} calls per script`

let simulators: SimulatorProcess | undefined

/** The gateway being measured, when `--trace` asks it to time its steps (SIGWINCH starts and ends a window). */
let traced: { child: ChildProcess, file: string } | undefined

async function traceWindow (): Promise<void> {
  if (traced == null) return
  await rm(traced.file, { force: true })
  traced.child.kill('SIGWINCH')
}

async function traceSummary (): Promise<TraceSummary | undefined> {
  if (traced == null) return undefined
  traced.child.kill('SIGWINCH')
  for (let i = 0; i < 50; i++) {
    const text = await readFile(traced.file, 'utf8').catch(() => '')
    if (text !== '') return JSON.parse(text) as TraceSummary
    await sleep(20)
  }
  throw new Error('the gateway wrote no trace')
}

const traceLines = (rows: TraceSummary['request']): string[] =>
  Object.entries(rows).map(([step, v]) => `    ${step.padEnd(42)} p50 ${fmt(v.p50, 3)}  p90 ${fmt(v.p90, 3)} ms`)

async function measure (targets: Target[], opts: { warmupMs: number, durationMs: number, onWindowEnd?: () => Promise<void>, trace?: (summary: TraceSummary | undefined) => void }): Promise<Run> {
  const meter = new CpuMeter()
  let cpu: CpuShare = {}
  let logged = 0
  let work = await scriptWork()
  const result = await closedLoop({
    targets,
    warmupMs: opts.warmupMs,
    durationMs: opts.durationMs,
    // the recorder keeps every event: start each window with an empty one
    onWindowStart: async () => {
      await simulators?.ask({ type: 'reset' }); await meter.begin(); logged = logBytes; work = await scriptWork()
      if (opts.trace != null) await traceWindow()
    },
    onWindowEnd: async () => {
      cpu = await meter.end(); logged = logBytes - logged; work = workSince(work, await scriptWork()); await opts.onWindowEnd?.()
      if (opts.trace != null) opts.trace(await traceSummary())
    }
  })
  if (result.errors > 0) throw new Error(`${result.errors} failed requests (first: ${result.firstError})`)
  if (result.completed === 0) throw new Error('no request completed in the measured window')
  return { ...result, cpu, logBytesPerRequest: logged / result.completed, redis: work }
}

/** Runs of one kind, as if they were one: latencies pooled, rates and CPU shares averaged. */
function merged (runs: Run[]): Run {
  const avg = (f: (r: Run) => number | undefined): number | undefined => {
    const v = runs.map(f).filter((x): x is number => x !== undefined)
    return v.length === 0 ? undefined : Math.round(v.reduce((a, b) => a + b, 0) / v.length)
  }
  const cpu: CpuShare = {}
  for (const role of ROLES) cpu[role] = avg((r) => r.cpu[role])
  const windowMs = runs.reduce((a, r) => a + r.windowMs, 0)
  const completed = runs.reduce((a, r) => a + r.completed, 0)
  return {
    completed,
    errors: 0,
    windowMs,
    latencies: runs.flatMap((r) => r.latencies),
    requestsPerSecond: completed / windowMs * 1000,
    cpu,
    logBytesPerRequest: runs.reduce((a, r) => a + r.logBytesPerRequest * r.completed, 0) / completed,
    redis: runs.reduce((a, r) => ({ scripts: a.scripts + r.redis.scripts, scriptUs: a.scriptUs + r.redis.scriptUs, innerCalls: a.innerCalls + r.redis.innerCalls }),
      { scripts: 0, scriptUs: 0, innerCalls: 0 })
  }
}

const scriptSummary = (w: ScriptWork, requests: number): object =>
  ({ scriptsPerRequest: +fmt(w.scripts / requests, 2), usPerScript: Math.round(w.scriptUs / w.scripts), callsPerScript: +fmt(w.innerCalls / w.scripts, 1) })

const fmt = (n: number, digits = 2): string => Number.isFinite(n) ? n.toFixed(digits) : '—'
const ROLES = ['clients', 'simulators', 'gateway', 'memory', 'bare', 'redis', 'nginx', 'others'] as const
const cpuText = (cpu: CpuShare): string =>
  ROLES.filter((r) => cpu[r] !== undefined).map((r) => `${r} ${cpu[r]}%`).join(', ')

/** `n` open event streams, read and thrown away as a browser's EventSource would read them. */
async function openEventStreams (url: string, n: number): Promise<{ bytes: () => number, close: () => void }> {
  const agent = new http.Agent({ keepAlive: false, maxSockets: n })
  const requests: http.ClientRequest[] = []
  let bytes = 0
  await Promise.all(Array.from({ length: n }, async () => await new Promise<void>((resolve, reject) => {
    const req = http.get(new URL('/gpu/events', url), { agent }, (res) => {
      if (res.statusCode !== 200) reject(new Error(`GET /gpu/events answered ${res.statusCode}`))
      res.on('data', (chunk: Buffer) => { bytes += chunk.length })
      res.once('error', () => {})
      resolve()
    })
    req.once('error', reject)
    requests.push(req)
  })))
  return { bytes: () => bytes, close: () => { for (const r of requests) r.destroy(); agent.destroy() } }
}

async function gatewayMetric (url: string, name: string): Promise<number> {
  const text = await (await fetch(`${url}/metrics`)).text()
  return Number(new RegExp(`^${name} (\\S+)$`, 'm').exec(text)?.[1] ?? NaN)
}

async function main (): Promise<void> {
  pids.redis = await redisPid()
  const dir = await mkdtemp(join(tmpdir(), 'maestro-bench-'))
  const sims = await SimulatorProcess.start(GPUS)
  simulators = sims
  pids.simulators = sims.child.pid
  let gateway: Awaited<ReturnType<typeof startGateway>> | undefined
  let nginx: Awaited<ReturnType<typeof startNginx>> | undefined
  const floors: { memory?: Awaited<ReturnType<typeof startGateway>>, bare?: Awaited<ReturnType<typeof startGateway>> } = {}
  const summary: Record<string, unknown> = {
    machine: { cpus: cpus().length, loadavg1m: Number(loadavg()[0].toFixed(2)), node: process.version },
    gateway: { process: 'child', leases: 'redis', inventory: 'file', logLevel: args['log-level'] },
    windowSeconds: windowMs / 1000
  }
  const lines: string[] = []
  const goals: Array<{ goal: string, target: string, reached: string, pass: boolean }> = []
  try {
    gateway = await startGateway(dir, sims.ports)
    if (args.trace) traced = { child: gateway.child, file: join(dir, 'trace.json') }
    pids.gateway = gateway.child.pid
    const gw = gateway.url
    const direct = (i: number): string => `http://127.0.0.1:${sims.ports[i]}`
    nginx = await startNginx(join(dir, 'nginx'), await freePort(), sims.ports.map((port, i) => ({ name: `sim-${i}`, port })))
    pids.nginx = nginx.child.pid
    const viaNginx = (i: number): string => `${nginx!.url}/sim-${i}`
    const measuresFloors = ['a', 'b', 'c'].some((x) => only.has(x))
    if (measuresFloors) {
      floors.memory = await startGateway(dir, sims.ports, 'memory')
      floors.bare = await startGateway(dir, sims.ports, 'bare')
      pids.memory = floors.memory.child.pid
      pids.bare = floors.bare.child.pid
    }
    const inMemory = floors.memory?.url ?? ''
    const bare = floors.bare?.url ?? ''
    process.stderr.write(`bench: ${GPUS} simulators, gateway at ${gw} (pid ${pids.gateway}), Redis ${redisUrl} (pid ${pids.redis ?? '?'}), load ${loadavg()[0].toFixed(2)}\n`)

    // A gateway runs for days: measure it with its code optimised, not while the JIT is still at work.
    process.stderr.write('bench: warming up\n')
    const all = Array.from({ length: GPUS }, (_, i) => i)
    await measure(all.map((i) => generate(gw, i)), { warmupMs: 0, durationMs: WARMUP_MS })
    await measure(all.map((i) => generate(direct(i), i)), { warmupMs: 0, durationMs: WARMUP_MS / 2 })
    await measure(all.map((i) => generate(viaNginx(i), i)), { warmupMs: 0, durationMs: WARMUP_MS / 2 })
    if (measuresFloors) {
      await measure(all.map((i) => generate(inMemory, i)), { warmupMs: 0, durationMs: WARMUP_MS / 2 })
      await measure(all.map((i) => generate(bare, i)), { warmupMs: 0, durationMs: WARMUP_MS / 2 })
    }
    await measure(Array.from({ length: WAITERS }, () => generate(gw, 0)), { warmupMs: 0, durationMs: WARMUP_MS / 2 })

    if (only.has('a')) {
      process.stderr.write(`bench: (a) ${GPUS} GPUs, ${GPUS} clients\n`)
      // Alternate direct, nginx and gateway runs, so that a change in the machine's load falls on all alike.
      const runs: { direct: Run[], nginx: Run[], gateway: Run[], memory: Run[], bare: Run[] } = { direct: [], nginx: [], gateway: [], memory: [], bare: [] }
      for (let r = 0; r < 2; r++) {
        runs.direct.push(await measure(all.map((i) => generate(direct(i), i)), { warmupMs: 500, durationMs: windowMs / 2 }))
        runs.nginx.push(await measure(all.map((i) => generate(viaNginx(i), i)), { warmupMs: 500, durationMs: windowMs / 2 }))
        runs.gateway.push(await measure(all.map((i) => generate(gw, i)), { warmupMs: 500, durationMs: windowMs / 2 }))
        runs.memory.push(await measure(all.map((i) => generate(inMemory, i)), { warmupMs: 500, durationMs: windowMs / 2 }))
        runs.bare.push(await measure(all.map((i) => generate(bare, i)), { warmupMs: 500, durationMs: windowMs / 2 }))
      }
      const d = merged(runs.direct)
      const n = merged(runs.nginx)
      const g = merged(runs.gateway)
      const m = merged(runs.memory)
      const b = merged(runs.bare)
      /** µs of the proxy's CPU per request */
      const perRequest = (r: Run, role: Role): number => (r.cpu[role] ?? NaN) * 10 / r.requestsPerSecond * 1000
      const floorRow = (r: Run, role: Role): object => ({ rps: Math.round(r.requestsPerSecond), cpuPerRequestUs: Math.round(perRequest(r, role)), toNginx: +fmt(r.requestsPerSecond / n.requestsPerSecond, 3) })
      const row = (r: Run): object => ({ rps: Math.round(r.requestsPerSecond), p50Ms: +fmt(percentile(r.latencies, 50)), p99Ms: +fmt(percentile(r.latencies, 99)), cpuPercent: r.cpu })
      const gatewayCpuPerRequest = (g.cpu.gateway ?? NaN) * 10 / g.requestsPerSecond
      const nginxCpuPerRequest = (n.cpu.nginx ?? NaN) * 10 / n.requestsPerSecond
      const toNginx = g.requestsPerSecond / n.requestsPerSecond
      const toDirect = g.requestsPerSecond / d.requestsPerSecond
      summary.a = {
        direct: row(d),
        nginx: { ...row(n), cpuPerRequestUs: Math.round(nginxCpuPerRequest * 1000) },
        gateway: { ...row(g), cpuPerRequestUs: Math.round(gatewayCpuPerRequest * 1000), logBytesPerRequest: Math.round(g.logBytesPerRequest), redis: scriptSummary(g.redis, g.completed) },
        gatewayToNginx: +fmt(toNginx, 3),
        gatewayToDirect: +fmt(toDirect, 3),
        floors: { memory: floorRow(m, 'memory'), bare: floorRow(b, 'bare') }
      }
      const floorLine = (what: string, r: Run, role: Role): string =>
        `    ${what.padEnd(52)} ${col(String(Math.round(r.requestsPerSecond)), 6)}  ${col(fmt(perRequest(r, role), 0), 6)} µs  ${col(fmt(r.requestsPerSecond / n.requestsPerSecond) + '×', 7)}`
      const col = (x: string, w = 10): string => x.padStart(w)
      lines.push(
        `(a) ${GPUS} single-GPU assignments, ${GPUS} concurrent clients, non-streamed /api/generate`,
        '                      direct       nginx     gateway   gateway/nginx  gateway/direct',
        `  requests/s        ${col(String(Math.round(d.requestsPerSecond)), 8)}  ${col(String(Math.round(n.requestsPerSecond)))}  ${col(String(Math.round(g.requestsPerSecond)))}  ${col(fmt(toNginx) + '×', 14)}  ${col(fmt(toDirect) + '×', 14)}`,
        `  p50 latency ms    ${col(fmt(percentile(d.latencies, 50)), 8)}  ${col(fmt(percentile(n.latencies, 50)))}  ${col(fmt(percentile(g.latencies, 50)))}`,
        `  p99 latency ms    ${col(fmt(percentile(d.latencies, 99)), 8)}  ${col(fmt(percentile(n.latencies, 99)))}  ${col(fmt(percentile(g.latencies, 99)))}`,
        `  CPU % of a core, direct:  ${cpuText(d.cpu)}`,
        `  CPU % of a core, nginx:   ${cpuText(n.cpu)}`,
        `  CPU % of a core, gateway: ${cpuText(g.cpu)}`,
        `  proxy CPU per request: nginx ${fmt(nginxCpuPerRequest * 1000, 0)} µs, gateway ${fmt(gatewayCpuPerRequest * 1000, 0)} µs (${fmt(gatewayCpuPerRequest / nginxCpuPerRequest, 1)}×); gateway log ${Math.round(g.logBytesPerRequest)} bytes per request`,
        `  gateway: ${scriptText(g.redis, g.completed)}`,
        '  what stands in the way, same run (requests/s, proxy CPU per request, / nginx):',
        floorLine('Fastify + reply-from alone (bench/bare-proxy.ts)', b, 'bare'),
        floorLine('the gateway, leases in process memory (one replica)', m, 'memory'),
        floorLine('the gateway, leases in Redis (as deployed)', g, 'gateway'),
        ''
      )
      goals.push({ goal: 'throughput vs nginx (a)', target: `≥ ${GOALS.nginxRatio}×`, reached: `${fmt(toNginx)}×`, pass: toNginx >= GOALS.nginxRatio })
    }

    if (only.has('b')) {
      process.stderr.write(`bench: (b) 1 GPU, ${WAITERS} waiting clients\n`)
      let report: Extract<SimulatorReply, { type: 'report' }> | undefined
      let trace: TraceSummary | undefined
      const g = await measure(Array.from({ length: WAITERS }, () => generate(gw, 0)), {
        warmupMs: 1000,
        durationMs: windowMs,
        onWindowEnd: async () => { report = await sims.ask<'report'>({ type: 'report', gpuId: benchGpuId(0) }) },
        trace: (t) => { trace = t }
      })
      if (report == null) throw new Error('no report from the simulators')
      if (report.overlaps > 0) throw new Error(`${report.overlaps} GPU overlaps: two requests were on one GPU at once`)
      // The same with the leases in process memory: the handover without its Redis round trip.
      let memoryReport: Extract<SimulatorReply, { type: 'report' }> | undefined
      await measure(Array.from({ length: WAITERS }, () => generate(inMemory, 0)), {
        warmupMs: 1000,
        durationMs: windowMs / 2,
        onWindowEnd: async () => { memoryReport = await sims.ask<'report'>({ type: 'report', gpuId: benchGpuId(0) }) }
      })
      if (memoryReport == null) throw new Error('no report from the simulators')
      if (memoryReport.overlaps > 0) throw new Error(`${memoryReport.overlaps} GPU overlaps with leases in memory`)
      const [memoryGapP50, memoryGapP99] = [percentile(memoryReport.gaps, 50), percentile(memoryReport.gaps, 99)]
      // Strict FIFO: each client waits for the 15 others ahead of it, then is served itself, so its
      // latency is 16 service times. The service time is what one request costs the GPU, measured:
      // its work plus the handover to the next (the idle gap, which has goals of its own).
      const busy = mean(report.busy)
      const service = g.windowMs / report.starts
      const fifo = WAITERS * service
      const p99 = percentile(g.latencies, 99)
      const gapP50 = percentile(report.gaps, 50)
      const gapP99 = percentile(report.gaps, 99)
      summary.b = {
        rps: Math.round(g.requestsPerSecond),
        gapP50Ms: +fmt(gapP50, 3),
        gapP99Ms: +fmt(gapP99, 3),
        gapMeanMs: +fmt(mean(report.gaps), 3),
        busyMs: +fmt(busy, 3),
        serviceMs: +fmt(service, 3),
        p50Ms: +fmt(percentile(g.latencies, 50)),
        p99Ms: +fmt(p99),
        strictFifoP99Ms: +fmt(fifo),
        fifoRatio: +fmt(p99 / fifo),
        busyOnlyFifoRatio: +fmt(p99 / (WAITERS * busy)),
        cpuPercent: g.cpu,
        redis: scriptSummary(g.redis, g.completed),
        trace: trace?.handover,
        floors: { memory: { gapP50Ms: +fmt(memoryGapP50, 3), gapP99Ms: +fmt(memoryGapP99, 3) } }
      }
      lines.push(
        `(b) one GPU, ${WAITERS} clients waiting on it (closed loop, through the gateway)`,
        `  requests/s                 ${Math.round(g.requestsPerSecond)}  (gateway CPU ${fmt((g.cpu.gateway ?? NaN) * 10 / g.requestsPerSecond * 1000, 0)} µs per request)`,
        `  GPU per request ms         ${fmt(service, 3)} = busy ${fmt(busy, 3)} + idle gap ${fmt(mean(report.gaps), 3)} (means)`,
        `  GPU idle gap ms            p50 ${fmt(gapP50, 3)}  p99 ${fmt(gapP99, 3)}  (${report.gaps.length} gaps)`,
        `  client latency ms          p50 ${fmt(percentile(g.latencies, 50))}  p99 ${fmt(p99)}`,
        `  strict FIFO ms             ${fmt(fifo)} (${WAITERS} × ${fmt(service, 3)})  → p99 is ${fmt(p99 / fifo)}× that; ${fmt(p99 / (WAITERS * busy))}× ${WAITERS} × busy alone`,
        `  CPU % of a core: ${cpuText(g.cpu)}`,
        `  ${scriptText(g.redis, g.completed)}`,
        `  what stands in the way: with its leases in process memory (no Redis round trip) the gateway's idle gap is p50 ${fmt(memoryGapP50, 3)}  p99 ${fmt(memoryGapP99, 3)} ms`,
        ...(trace != null ? [`  handover inside the gateway (--trace, ${trace.handovers} handovers):`, ...traceLines(trace.handover)] : []),
        ''
      )
      goals.push(
        { goal: 'GPU idle gap p50 (b)', target: `≤ ${GOALS.gapP50Ms} ms`, reached: `${fmt(gapP50, 3)} ms`, pass: gapP50 <= GOALS.gapP50Ms },
        { goal: 'GPU idle gap p99 (b)', target: `≤ ${GOALS.gapP99Ms} ms`, reached: `${fmt(gapP99, 3)} ms`, pass: gapP99 <= GOALS.gapP99Ms },
        { goal: `${WAITERS}-waiter p99 / strict FIFO (b)`, target: `≤ ${GOALS.fifoRatio}×`, reached: `${fmt(p99 / fifo)}×`, pass: p99 / fifo <= GOALS.fifoRatio }
      )
    }

    if (only.has('c')) {
      process.stderr.write('bench: (c) one client\n')
      // Alternate short runs so that a change in the machine's load falls on both sides alike.
      const runs: { direct: Run[], nginx: Run[], gateway: Run[], memory: Run[], bare: Run[] } = { direct: [], nginx: [], gateway: [], memory: [], bare: [] }
      const per = Math.max(500, Math.round(windowMs / 2))
      /** the last gateway run's */
      let trace: TraceSummary | undefined
      for (let r = 0; r < 3; r++) {
        runs.direct.push(await measure([generate(direct(0), 0)], { warmupMs: 200, durationMs: per }))
        runs.nginx.push(await measure([generate(viaNginx(0), 0)], { warmupMs: 200, durationMs: per }))
        runs.gateway.push(await measure([generate(gw, 0)], { warmupMs: 200, durationMs: per, trace: (t) => { trace = t } }))
        runs.memory.push(await measure([generate(inMemory, 0)], { warmupMs: 200, durationMs: per }))
        runs.bare.push(await measure([generate(bare, 0)], { warmupMs: 200, durationMs: per }))
      }
      const m50 = percentile(merged(runs.memory).latencies, 50)
      const b50 = percentile(merged(runs.bare).latencies, 50)
      const d = merged(runs.direct).latencies
      const n = merged(runs.nginx).latencies
      const [n50, n99] = [percentile(n, 50), percentile(n, 99)]
      const gr = merged(runs.gateway)
      const g = gr.latencies
      const [d50, d99, g50, g99] = [percentile(d, 50), percentile(d, 99), percentile(g, 50), percentile(g, 99)]
      summary.c = { directP50Ms: +fmt(d50, 3), directP99Ms: +fmt(d99, 3), gatewayP50Ms: +fmt(g50, 3), gatewayP99Ms: +fmt(g99, 3), addedP50Ms: +fmt(g50 - d50, 3), addedP99Ms: +fmt(g99 - d99, 3), nginxP50Ms: +fmt(n50, 3), nginxP99Ms: +fmt(n99, 3), nginxAddedP50Ms: +fmt(n50 - d50, 3), floors: { memoryAddedP50Ms: +fmt(m50 - d50, 3), bareAddedP50Ms: +fmt(b50 - d50, 3) }, requests: { direct: d.length, nginx: n.length, gateway: g.length }, cpuPercent: gr.cpu, redis: scriptSummary(gr.redis, gr.completed), trace: trace?.request }
      lines.push(
        '(c) one client, one request at a time',
        '                      direct       nginx     gateway   added by nginx  added by gateway',
        `  p50 latency ms    ${fmt(d50, 3).padStart(8)}  ${fmt(n50, 3).padStart(10)}  ${fmt(g50, 3).padStart(10)}  ${fmt(n50 - d50, 3).padStart(14)}  ${fmt(g50 - d50, 3).padStart(16)}`,
        `  p99 latency ms    ${fmt(d99, 3).padStart(8)}  ${fmt(n99, 3).padStart(10)}  ${fmt(g99, 3).padStart(10)}  ${fmt(n99 - d99, 3).padStart(14)}  ${fmt(g99 - d99, 3).padStart(16)}`,
        `  (${d.length} direct and ${g.length} gateway requests; gateway CPU ${fmt((gr.cpu.gateway ?? NaN) * 10 / gr.requestsPerSecond * 1000, 0)} µs per request)`,
        `  CPU % of a core, gateway runs: ${cpuText(gr.cpu)}`,
        `  ${scriptText(gr.redis, gr.completed)}`,
        `  what stands in the way, added p50: Fastify + reply-from alone ${fmt(b50 - d50, 3)} ms; the gateway with its leases in process memory ${fmt(m50 - d50, 3)} ms`,
        ...(trace != null ? [`  one request inside the gateway (--trace, the last run's ${trace.requests} requests):`, ...traceLines(trace.request)] : []),
        ''
      )
      goals.push({ goal: 'added latency p50 (c)', target: `≤ ${GOALS.addedP50Ms} ms`, reached: `${fmt(g50 - d50, 3)} ms`, pass: g50 - d50 <= GOALS.addedP50Ms })
    }

    // Nothing after (c) measures the floors: stopped, their background polls take nothing from the rest.
    for (const floor of [floors.memory, floors.bare]) if (floor != null) await stopGateway(floor.child)
    delete pids.memory
    delete pids.bare

    if (only.has('events')) {
      process.stderr.write(`bench: (events) ${GPUS} clients, without and with ${EVENT_STREAMS} open event streams\n`)
      // Alternate, so that a change in the machine's load falls on both sides alike.
      const runs: { without: Run[], with: Run[] } = { without: [], with: [] }
      let streamed = 0
      let reads = 0
      let seconds = 0
      for (let r = 0; r < 2; r++) {
        runs.without.push(await measure(all.map((i) => generate(gw, i)), { warmupMs: 500, durationMs: windowMs / 2 }))
        const streams = await openEventStreams(gw, EVENT_STREAMS)
        try {
          const readers = await gatewayMetric(gw, 'maestro_event_stream_readers')
          if (readers !== EVENT_STREAMS) throw new Error(`${readers} event streams open on the gateway, not ${EVENT_STREAMS}`)
          const [bytesBefore, readsBefore, started] = [streams.bytes(), await gatewayMetric(gw, 'maestro_fleet_state_reads_total'), performance.now()]
          runs.with.push(await measure(all.map((i) => generate(gw, i)), { warmupMs: 500, durationMs: windowMs / 2 }))
          streamed += streams.bytes() - bytesBefore
          reads += await gatewayMetric(gw, 'maestro_fleet_state_reads_total') - readsBefore
          seconds += (performance.now() - started) / 1000
        } finally {
          streams.close()
        }
      }
      const w = merged(runs.without)
      const e = merged(runs.with)
      const ratio = e.requestsPerSecond / w.requestsPerSecond
      summary.events = {
        withoutRps: Math.round(w.requestsPerSecond),
        withRps: Math.round(e.requestsPerSecond),
        ratio: +fmt(ratio, 3),
        streams: EVENT_STREAMS,
        streamedKBps: Math.round(streamed / seconds / 1024),
        stateReadsPerSecond: +fmt(reads / seconds, 1),
        cpuPercent: { without: w.cpu, with: e.cpu }
      }
      lines.push(
        `(events) ${GPUS} clients on /api/generate, without and with ${EVENT_STREAMS} open GET /gpu/events streams`,
        `  requests/s        without ${Math.round(w.requestsPerSecond)}   with ${Math.round(e.requestsPerSecond)}   → ${fmt(ratio, 3)}×`,
        `  p99 latency ms    without ${fmt(percentile(w.latencies, 99))}   with ${fmt(percentile(e.latencies, 99))}`,
        `  streams carried ${Math.round(streamed / seconds / 1024)} KiB/s in all; ${fmt(reads / seconds, 1)} fleet state reads/s (one source for every stream)`,
        `  CPU % of a core, without: ${cpuText(w.cpu)}`,
        `  CPU % of a core, with:    ${cpuText(e.cpu)}`,
        ''
      )
      goals.push({ goal: `${EVENT_STREAMS} event streams, throughput kept (events)`, target: `≥ ${GOALS.eventStreamsRatio}×`, reached: `${fmt(ratio, 3)}×`, pass: ratio >= GOALS.eventStreamsRatio })
    }

    // (d), (e): the same engine case twice, one thing changed; alternated so that the machine's load falls on both alike
    const compare = async (name: string, what: string, base: EngineCase, big: EngineCase): Promise<void> => {
      const rates: { base: number[], big: number[] } = { base: [], big: [] }
      for (let r = 0; r < 2; r++) {
        rates.base.push(await handoffRate(redisUrl, `${prefix}${name}${r}a:`, base, windowMs / 2))
        rates.big.push(await handoffRate(redisUrl, `${prefix}${name}${r}b:`, big, windowMs / 2))
      }
      const b = mean(rates.base)
      const g = mean(rates.big)
      summary[name] = { what, base, big, baseGrantsPerSecond: Math.round(b), bigGrantsPerSecond: Math.round(g), ratio: +fmt(g / b) }
      lines.push(`(${name}) ${what}: ${Math.round(b)} vs ${Math.round(g)} grants/s (${fmt(g / b)}×)`)
      goals.push({ goal: `${what} (${name})`, target: `≥ ${GOALS.costRatio}×`, reached: `${fmt(g / b)}×`, pass: g / b >= GOALS.costRatio })
    }
    if (only.has('d')) {
      process.stderr.write('bench: (d) 2,048 candidates vs 64\n')
      await compare('d', '64 → 2,048 candidates, 4 free, 16 clients',
        { candidates: 64, free: 4, clients: 16, queues: 1 }, { candidates: 2048, free: 4, clients: 16, queues: 1 })
    }
    if (only.has('e')) {
      process.stderr.write('bench: (e) one GPU, 1,000 waiters vs 16; 1,000 queues vs one\n')
      await compare('e', 'one GPU, 16 → 1,000 waiters',
        { candidates: 1, free: 1, clients: 16, queues: 1 }, { candidates: 1, free: 1, clients: 1000, queues: 1 })
      await compare('e2', 'one GPU, 1,000 waiters in 1 → 1,000 queues',
        { candidates: 1, free: 1, clients: 1000, queues: 1 }, { candidates: 1, free: 1, clients: 1000, queues: 1000 })
      lines.push('')
    }

    if (only.has('f')) {
      process.stderr.write('bench: (f) a capacity-4 server, 16 clients\n')
      const runs: { direct: Run[], gateway: Run[] } = { direct: [], gateway: [] }
      const clients = Array.from({ length: WAITERS }, () => WIDE)
      for (let r = 0; r < 2; r++) {
        runs.direct.push(await measure(clients.map((i) => generate(direct(i), i)), { warmupMs: 500, durationMs: windowMs / 2 }))
        runs.gateway.push(await measure(clients.map((i) => generate(gw, i)), { warmupMs: 500, durationMs: windowMs / 2 }))
      }
      const d = merged(runs.direct)
      const g = merged(runs.gateway)
      const ratio = g.requestsPerSecond / d.requestsPerSecond
      summary.f = { directRps: Math.round(d.requestsPerSecond), gatewayRps: Math.round(g.requestsPerSecond), ratio: +fmt(ratio), gatewayP50Ms: +fmt(percentile(g.latencies, 50)), directP50Ms: +fmt(percentile(d.latencies, 50)), cpuPercent: g.cpu }
      lines.push(
        `(f) one server with 4 parallel slots (${WIDE_TOKENS} tokens × ${WIDE_TOKEN_MS} ms each), ${WAITERS} clients`,
        `  requests/s  direct ${Math.round(d.requestsPerSecond)}  gateway ${Math.round(g.requestsPerSecond)} (${fmt(ratio)}×)`,
        `  p50 ms      direct ${fmt(percentile(d.latencies, 50))}  gateway ${fmt(percentile(g.latencies, 50))}`,
        `  CPU % of a core, gateway runs: ${cpuText(g.cpu)}`,
        ''
      )
      goals.push({ goal: 'capacity-4 server, gateway / direct (f)', target: `≥ ${GOALS.capacityRatio}×`, reached: `${fmt(ratio)}×`, pass: ratio >= GOALS.capacityRatio })
    }
  } finally {
    if (gateway != null) await stopGateway(gateway.child)
    for (const floor of [floors.memory, floors.bare]) if (floor != null) await stopGateway(floor.child)
    if (nginx != null) await stopNginx(nginx.child)
    await sims.close()
    await deleteKeys()
    statsClient?.disconnect()
    await rm(dir, { recursive: true, force: true })
  }

  const header = `AI Maestro gateway benchmark: ${cpus().length} cores, gateway LOG_LEVEL=${args['log-level']}, ${windowMs / 1000} s measured per scenario (CPU 'others' = the rest of the machine)`
  process.stdout.write([header, '', ...lines].join('\n') + '\n')
  if (goals.length > 0) {
    const w = Math.max(...goals.map((g) => g.goal.length))
    process.stdout.write(`${'goal'.padEnd(w)}  ${'target'.padEnd(9)}  ${'reached'.padEnd(10)}  result\n`)
    for (const g of goals) process.stdout.write(`${g.goal.padEnd(w)}  ${g.target.padEnd(9)}  ${g.reached.padEnd(10)}  ${g.pass ? 'pass' : 'FAIL'}\n`)
    summary.goals = goals
  }
  process.stdout.write(`BENCH_JSON ${JSON.stringify(summary)}\n`)
}

await main()
