/**
 * The fleet scenarios (a), (b), (c), (events), (f) and (j) measure on: 64 Ollama simulators (and
 * (f)'s capacity-4 server) in one child process (bench/simulator-process.ts), the gateway as
 * deployed, nginx in front of each simulator, and, for (a), (b), (c), the floors (the gateway with
 * its leases in process memory, and Fastify + reply-from alone). Also the closed-loop measurement
 * every one of them uses: CPU, log bytes and the lease scripts' work over the measured window.
 */
import { fork, type ChildProcess } from 'node:child_process'
import { readFile, rm } from 'node:fs/promises'
import { loadavg } from 'node:os'
import { join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'
import { CpuMeter, pids, ROLES, type CpuShare } from './cpu.js'
import { benchModel, inventoryFile, sharedInventoryFile, type SimulatorCommand, type SimulatorReply } from './fleet.js'
import { closedLoop, sleep, type LoadResult, type Target } from './load.js'
import { startNginx, stopNginx } from './nginx.js'
import { freePort, startGatewayProcess, stopProcess } from './processes.js'
import { scriptWork, workSince, type ScriptWork } from './redis-work.js'
import { fmt } from './report.js'
import type { BenchContext } from './scenario.js'
import type { TraceSummary } from './trace.js'

const here = fileURLToPath(new URL('.', import.meta.url))

export const GPUS = 64
export const WAITERS = 16
const WARMUP_MS = 3000
export const EVENT_STREAMS = 200
/** (f): the capacity-4 server's model and GPU, after the 64 single-GPU ones */
export const WIDE = GPUS

/** The child process holding the simulators, driven over IPC. */
export class SimulatorProcess {
  private readonly replies: Array<(reply: SimulatorReply) => void> = []
  private constructor (readonly child: ChildProcess, readonly ports: number[]) {
    child.on('message', (reply: SimulatorReply) => this.replies.shift()?.(reply))
  }

  /** `count` single-model servers (and (f)'s), or (j)'s two servers with 'shared' */
  static async start (count: number | 'shared'): Promise<SimulatorProcess> {
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

/**
 * What is measured in the gateway's place: the gateway as deployed (leases in Redis), the same
 * gateway with its leases in process memory (`LEASE_STORE=memory`, no Redis at all), or the bare
 * stack (bench/bare-proxy.ts); or (j)'s gateway ('shared': Redis leases, (j)'s inventory, keys
 * under a prefix of its own). Only the first gets --profile, --trace and --gateway-node-options,
 * and only its log is counted.
 */
export type ProxyKind = 'gateway' | 'memory' | 'bare' | 'shared'

export interface Run extends LoadResult {
  cpu: CpuShare
  logBytesPerRequest: number
  redis: ScriptWork
}

export const generate = (url: string, i: number): Target => ({
  url: new URL(url + '/api/generate'),
  body: JSON.stringify({ model: benchModel(i), prompt: 'Why is the sky blue?', stream: false })
})

/** Runs of one kind, as if they were one: latencies pooled, rates and CPU shares averaged. */
export function merged (runs: Run[]): Run {
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

export const traceLines = (rows: TraceSummary['request']): string[] =>
  Object.entries(rows).map(([step, v]) => `    ${step.padEnd(42)} p50 ${fmt(v.p50, 3)}  p90 ${fmt(v.p90, 3)} ms`)

export interface MeasureOptions {
  warmupMs: number
  durationMs: number
  onWindowEnd?: () => Promise<void>
  trace?: (summary: TraceSummary | undefined) => void
}

export class GatewayFleet {
  /** Bytes the gateway has logged so far. */
  private logBytes = 0
  /** The gateway being measured, when `--trace` asks it to time its steps (SIGWINCH starts and ends a window). */
  private traced: { child: ChildProcess, file: string } | undefined
  gateway!: { child: ChildProcess, url: string }
  nginx!: { child: ChildProcess, url: string }
  readonly floors: { memory?: { child: ChildProcess, url: string }, bare?: { child: ChildProcess, url: string } } = {}

  private constructor (private readonly ctx: BenchContext, readonly sims: SimulatorProcess) {}

  /** The simulators, the gateway, nginx and (with `floors`) the floors, started. */
  static async start (ctx: BenchContext, opts: { floors: boolean }): Promise<GatewayFleet> {
    const sims = await SimulatorProcess.start(GPUS)
    pids.simulators = sims.child.pid
    const fleet = new GatewayFleet(ctx, sims)
    try {
      fleet.gateway = await fleet.startGateway(ctx.dir, sims.ports)
      if (ctx.trace) fleet.traced = { child: fleet.gateway.child, file: join(ctx.dir, 'trace.json') }
      pids.gateway = fleet.gateway.child.pid
      fleet.nginx = await startNginx(join(ctx.dir, 'nginx'), await freePort(), sims.ports.map((port, i) => ({ name: `sim-${i}`, port })))
      pids.nginx = fleet.nginx.child.pid
      if (opts.floors) {
        fleet.floors.memory = await fleet.startGateway(ctx.dir, sims.ports, 'memory')
        fleet.floors.bare = await fleet.startGateway(ctx.dir, sims.ports, 'bare')
        pids.memory = fleet.floors.memory.child.pid
        pids.bare = fleet.floors.bare.child.pid
      }
    } catch (err) {
      await fleet.close()
      throw err
    }
    process.stderr.write(`bench: ${GPUS} simulators, gateway at ${fleet.gateway.url} (pid ${pids.gateway}), Redis ${ctx.redisUrl} (pid ${pids.redis ?? '?'}), load ${loadavg()[0].toFixed(2)}\n`)
    return fleet
  }

  readonly direct = (i: number): string => `http://127.0.0.1:${this.sims.ports[i]}`
  readonly viaNginx = (i: number): string => `${this.nginx.url}/sim-${i}`
  get inMemory (): string { return this.floors.memory?.url ?? '' }
  get bare (): string { return this.floors.bare?.url ?? '' }

  /** A gateway runs for days: measure it with its code optimised, not while the JIT is still at work. */
  async warmUp (): Promise<void> {
    process.stderr.write('bench: warming up\n')
    const all = Array.from({ length: GPUS }, (_, i) => i)
    const gw = this.gateway.url
    await this.measure(all.map((i) => generate(gw, i)), { warmupMs: 0, durationMs: WARMUP_MS })
    await this.measure(all.map((i) => generate(this.direct(i), i)), { warmupMs: 0, durationMs: WARMUP_MS / 2 })
    await this.measure(all.map((i) => generate(this.viaNginx(i), i)), { warmupMs: 0, durationMs: WARMUP_MS / 2 })
    if (this.floors.memory != null) {
      await this.measure(all.map((i) => generate(this.inMemory, i)), { warmupMs: 0, durationMs: WARMUP_MS / 2 })
      await this.measure(all.map((i) => generate(this.bare, i)), { warmupMs: 0, durationMs: WARMUP_MS / 2 })
    }
    await this.measure(Array.from({ length: WAITERS }, () => generate(gw, 0)), { warmupMs: 0, durationMs: WARMUP_MS / 2 })
  }

  async startGateway (dir: string, ports: number[], kind: ProxyKind = 'gateway'): Promise<{ child: ChildProcess, url: string }> {
    const { ctx } = this
    const env: Record<string, string | undefined> = {
      REDIS_URL: ctx.redisUrl,
      REDIS_KEY_PREFIX: ctx.prefix,
      LOG_LEVEL: ctx.logLevel,
      EVENT_STREAMS_MAX: String(EVENT_STREAMS)
    }
    if (kind === 'memory') {
      env.LEASE_STORE = 'memory'
      env.REDIS_URL = undefined
    }
    if (kind === 'shared') env.REDIS_KEY_PREFIX = `${ctx.prefix}j:`
    const flags = kind === 'gateway' ? ctx.gatewayNodeOptions.split(' ').filter(Boolean) : []
    if (ctx.profile != null && kind === 'gateway') flags.push('--cpu-prof', '--cpu-prof-dir', resolve(ctx.profile))
    if (ctx.trace && kind === 'gateway') {
      flags.push(`--import=${join(here, 'trace.js')}`)
      env.MAESTRO_TRACE_FILE = join(dir, 'trace.json')
    }
    return await startGatewayProcess({
      dir,
      inventory: kind === 'shared' ? sharedInventoryFile(ports) : inventoryFile(ports),
      env,
      flags,
      script: kind === 'bare' ? join(here, 'bare-proxy.js') : undefined,
      // its log lines are counted, not kept
      onLog: kind === 'gateway' ? (chunk) => { this.logBytes += chunk.length } : undefined,
      name: kind
    })
  }

  private async traceWindow (): Promise<void> {
    if (this.traced == null) return
    await rm(this.traced.file, { force: true })
    this.traced.child.kill('SIGWINCH')
  }

  private async traceSummary (): Promise<TraceSummary | undefined> {
    if (this.traced == null) return undefined
    this.traced.child.kill('SIGWINCH')
    for (let i = 0; i < 50; i++) {
      const text = await readFile(this.traced.file, 'utf8').catch(() => '')
      if (text !== '') return JSON.parse(text) as TraceSummary
      await sleep(20)
    }
    throw new Error('the gateway wrote no trace')
  }

  /**
   * Short runs of each side in turn, `rounds` times, merged per side: a change in the machine's
   * load falls on every side alike. A side's own options (a trace) add to the shared ones.
   */
  async alternate<Side extends string> (sides: Record<Side, Target[] | { targets: Target[], opts: Partial<MeasureOptions> }>, rounds: number, opts: MeasureOptions): Promise<Record<Side, Run>> {
    const runs = new Map<Side, Run[]>()
    for (let r = 0; r < rounds; r++) {
      for (const [side, spec] of Object.entries(sides) as Array<[Side, Target[] | { targets: Target[], opts: Partial<MeasureOptions> }]>) {
        const [targets, own] = Array.isArray(spec) ? [spec, {}] : [spec.targets, spec.opts]
        const run = await this.measure(targets, { ...opts, ...own })
        runs.set(side, [...(runs.get(side) ?? []), run])
      }
    }
    return Object.fromEntries([...runs].map(([side, list]) => [side, merged(list)])) as Record<Side, Run>
  }

  async measure (targets: Target[], opts: MeasureOptions): Promise<Run> {
    const { redisUrl } = this.ctx
    const meter = new CpuMeter()
    let cpu: CpuShare = {}
    let logged = 0
    let work = await scriptWork(redisUrl)
    const result = await closedLoop({
      targets,
      warmupMs: opts.warmupMs,
      durationMs: opts.durationMs,
      // the recorder keeps every event: start each window with an empty one
      onWindowStart: async () => {
        await this.sims.ask({ type: 'reset' }); await meter.begin(); logged = this.logBytes; work = await scriptWork(redisUrl)
        if (opts.trace != null) await this.traceWindow()
      },
      onWindowEnd: async () => {
        cpu = await meter.end(); logged = this.logBytes - logged; work = workSince(work, await scriptWork(redisUrl)); await opts.onWindowEnd?.()
        if (opts.trace != null) opts.trace(await this.traceSummary())
      }
    })
    if (result.errors > 0) throw new Error(`${result.errors} failed requests (first: ${result.firstError})`)
    if (result.completed === 0) throw new Error('no request completed in the measured window')
    return { ...result, cpu, logBytesPerRequest: logged / result.completed, redis: work }
  }

  /** Nothing after (c) measures the floors: stopped, their background polls take nothing from the rest. */
  async stopFloors (): Promise<void> {
    for (const floor of [this.floors.memory, this.floors.bare]) if (floor != null) await stopProcess(floor.child)
    delete this.floors.memory
    delete this.floors.bare
    delete pids.memory
    delete pids.bare
  }

  async close (): Promise<void> {
    if (this.gateway != null) await stopProcess(this.gateway.child)
    await this.stopFloors()
    if (this.nginx != null) await stopNginx(this.nginx.child)
    await this.sims.close()
  }
}
