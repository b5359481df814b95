/**
 * Scheduler v3's proof (scenarios (g), (h), (i)): the same workload against four contenders in front
 * of the same simulated servers, each with a fresh fleet (cold prompt caches, no model resident):
 *
 *   gateway            two replicas (`node dist/server.js`, one Redis), each request to either at random
 *   nginx round-robin  one upstream of every server, nginx's default balancing
 *   nginx least_conn   the same with `least_conn`
 *   sticky             the reference: the bench client pins each session (or model) to one server
 *                      itself and talks to it directly (perfect cache, no balancing)
 *
 * Clients are the `ollama` library streaming `/api/chat`; time to first token is the time to its
 * first streamed line, measured by the client.
 */
import { mkdir } from 'node:fs/promises'
import { join } from 'node:path'
import { performance } from 'node:perf_hooks'
import { Ollama, type Message } from 'ollama'
import { CostFleet, TAG_PREFIX, type CostFleetOptions, type CostReport } from './cost-fleet.js'
import { startBalancingNginx, stopNginx } from './nginx.js'
import { deleteKeys, freePort, startGatewayProcess, stopProcess } from './processes.js'
import type { Report } from './report.js'

export const CONTENDERS = ['gateway', 'nginx round-robin', 'nginx least_conn', 'sticky'] as const
export type Contender = typeof CONTENDERS[number]

/** What a scheduling scenario needs of the run. */
export interface SchedulingContext {
  windowMs: number
  redisUrl: string
  /** the run's Redis key prefix; each contender's gateway uses one of its own under it */
  prefix: string
  /** the run's temporary folder */
  dir: string
  logLevel: string
  report: Report
}

/**
 * Where one request goes: `stickyKey` picks the server for the sticky reference (a session's or a
 * model's number); the others ignore it. A fresh client per base URL and key, reused.
 */
export type Route = (stickyKey: number, apiKey?: string) => Ollama

/** The inventory of `ports`, one GPU and one assignment each serving `model` ('*': any model). */
export function fleetInventory (ports: number[], model: string): object {
  return {
    computers: [{ id: 1, name: 'bench', ip: '127.0.0.1' }],
    gpus: ports.map((_, i) => ({ id: i + 1, computer: 1, name: `gpu ${i}`, weight: 1 })),
    assignments: ports.map((port, i) => ({ id: i + 1, name: `sim-${i}`, model, kind: 'llm', port, gpus: [i + 1] }))
  }
}

export interface ContenderRun<T> {
  contender: Contender
  result: T
  /** what the servers computed, since the workload's mark (or the start) */
  costs: CostReport
}

/**
 * Runs `workload` once against `contender`: a fresh fleet, the contender in front of it, the
 * workload, the servers' counts, everything stopped.
 */
export async function runContender<T> (
  ctx: SchedulingContext,
  scenario: string,
  contender: Contender,
  fleet: CostFleetOptions,
  opts: { model: string, apiKeys?: string[] },
  workload: (route: Route, fleet: CostFleet) => Promise<T>
): Promise<ContenderRun<T>> {
  const sims = await CostFleet.start(fleet)
  const dir = join(ctx.dir, `${scenario}-${contender.replace(/[^a-z]+/g, '-')}`)
  await mkdir(dir, { recursive: true })
  const stops: Array<() => Promise<void>> = []
  const prefix = `${ctx.prefix}${scenario}-${CONTENDERS.indexOf(contender)}:`
  try {
    let bases: string[]
    if (contender === 'gateway') {
      const env = { REDIS_URL: ctx.redisUrl, REDIS_KEY_PREFIX: prefix, LOG_LEVEL: ctx.logLevel, API_KEYS: opts.apiKeys?.join(',') }
      bases = []
      for (const replica of [1, 2]) {
        const replicaDir = join(dir, `replica-${replica}`)
        await mkdir(replicaDir)
        const g = await startGatewayProcess({ dir: replicaDir, inventory: fleetInventory(sims.ports, opts.model), env, name: `gateway replica ${replica}` })
        stops.push(async () => await stopProcess(g.child))
        bases.push(g.url)
      }
    } else if (contender === 'sticky') {
      bases = sims.ports.map((p) => `http://127.0.0.1:${p}`)
    } else {
      const nginx = await startBalancingNginx(join(dir, 'nginx'), await freePort(), sims.ports, contender === 'nginx least_conn' ? 'least_conn' : 'round-robin')
      stops.push(async () => await stopNginx(nginx.child))
      bases = [nginx.url]
    }
    const clients = new Map<string, Ollama>()
    const client = (base: string, apiKey?: string): Ollama => {
      const id = `${base} ${apiKey ?? ''}`
      let c = clients.get(id)
      if (c === undefined) {
        c = new Ollama({ host: base, headers: apiKey === undefined ? {} : { Authorization: `Bearer ${apiKey}` } })
        clients.set(id, c)
      }
      return c
    }
    const route: Route = contender === 'gateway'
      ? (_, apiKey) => client(bases[Math.floor(Math.random() * bases.length)], apiKey)
      : contender === 'sticky'
        ? (stickyKey, apiKey) => client(bases[stickyKey % bases.length], apiKey)
        : (_, apiKey) => client(bases[0], apiKey)
    const result = await workload(route, sims)
    return { contender, result, costs: await sims.report() }
  } finally {
    for (const stop of stops.reverse()) await stop()
    await sims.close()
    await deleteKeys(ctx.redisUrl, prefix)
  }
}

export interface ChatAnswer {
  ttftMs: number
  content: string
}

/** One streamed `/api/chat`: the time to its first line, and the answer's text. */
export async function streamChat (client: Ollama, model: string, messages: Message[]): Promise<ChatAnswer> {
  const started = performance.now()
  let ttftMs = NaN
  let content = ''
  const stream = await client.chat({ model, messages, stream: true })
  for await (const part of stream) {
    if (Number.isNaN(ttftMs)) ttftMs = performance.now() - started
    content += part.message?.content ?? ''
  }
  return { ttftMs, content }
}

/** A small seeded generator (mulberry32): the same workload for every contender. */
export function seeded (seed: number): () => number {
  let a = seed >>> 0
  return () => {
    a = (a + 0x6D2B79F5) >>> 0
    let t = a
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
}

const LETTERS = 'abcdefghijklmnopqrstuvwxyz'

/**
 * About `tokens` tokens of text no other call gives: words of three letters, each with its space,
 * one token each under the simulator's tokeniser (words cut into pieces of at most 4 characters).
 */
export function words (random: () => number, tokens: number): string {
  const out: string[] = []
  for (let i = 0; i < tokens; i++) {
    let w = ''
    for (let j = 0; j < 3; j++) w += LETTERS[Math.floor(random() * LETTERS.length)]
    out.push(w)
  }
  return out.join(' ')
}

/** A user message that carries its session's or key's tag (bench/cost-fleet.ts, tagOf). */
export const tagged = (tag: string, text: string): string => `${TAG_PREFIX}${tag} ${text}`

/** Sum of the values of a map-like object. */
export const total = (values: Iterable<number>): number => [...values].reduce((a, b) => a + b, 0)
