/**
 * `npm run bench`: the gateway measured against the same simulated servers reached directly, through
 * nginx, and (Scheduler v3's scenarios) against nginx's balancers and a sticky reference. Each
 * scenario is a file of bench/scenarios/ (`--list` prints them); this file lists them, starts what
 * they share and runs the ones `--only` names, in the order of SCENARIOS.
 *
 * Processes (2 cores on the reference machine, all competing for them):
 *   this one       the load generator (closed-loop clients with keep-alive)
 *   simulators     (a)–(f), (j): one child process holding 64 Ollama simulators, one GPU and one
 *                  model each (bench/simulator-process.ts); (g), (h), (i): a fresh cost-model fleet
 *                  per contender (bench/cost-simulators.ts)
 *   gateway        `node dist/server.js` as a child process, as it is deployed: Redis leases,
 *                  inventory from a file (the inventory is cached and not on the request path)
 *   redis-server   the one at REDIS_URL, under a key prefix of its own, deleted afterwards
 *   nginx          a plain reverse proxy to the same simulators (one worker), the yardstick
 *   floors         what stands in the gateway's way, measured beside it in (a), (b), (c): the same
 *                  gateway with its leases in process memory, and Fastify + reply-from alone
 *
 * Options: --seconds N (measured window per run, default 4), --only a,b,c (default every scenario
 * but `events`), --list, --log-level L (the gateway's LOG_LEVEL, default info as deployed),
 * --profile DIR (write the gateway's .cpuprofile), --gateway-node-options "FLAGS" (node flags for
 * the gateway process only), --trace (time the steps of a request at one client (c) and of a
 * handover on one GPU (b) inside the gateway: bench/trace.ts).
 */
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir, loadavg, cpus } from 'node:os'
import { join } from 'node:path'
import { parseArgs } from 'node:util'
import { randomUUID } from 'node:crypto'
import { pids } from './cpu.js'
import { GatewayFleet } from './gateway-fleet.js'
import { deleteKeys } from './processes.js'
import { closeScriptWork, redisPid } from './redis-work.js'
import { printReport, type Report } from './report.js'
import type { BenchContext, Scenario } from './scenario.js'
import { scenario as a } from './scenarios/a-throughput.js'
import { scenario as b } from './scenarios/b-one-gpu-waiters.js'
import { scenario as c } from './scenarios/c-one-client.js'
import { scenario as events } from './scenarios/events-streams.js'
import { scenario as d } from './scenarios/d-candidates.js'
import { scenario as e } from './scenarios/e-waiters.js'
import { scenario as f } from './scenarios/f-capacity-four.js'
import { scenario as j } from './scenarios/j-shared-gpu.js'
import { scenario as g } from './scenarios/g-agent-sessions.js'
import { scenario as h } from './scenarios/h-shared-models.js'
import { scenario as i } from './scenarios/i-fairness.js'

/** Every scenario, in the order they run. */
const SCENARIOS: Scenario[] = [a, b, c, events, d, e, f, j, g, h, i]

const { values: args } = parseArgs({
  options: {
    seconds: { type: 'string', default: '4' },
    only: { type: 'string', default: SCENARIOS.filter((s) => s.letter !== 'events').map((s) => s.letter).join(',') },
    list: { type: 'boolean', default: false },
    'log-level': { type: 'string', default: 'info' },
    profile: { type: 'string' },
    'gateway-node-options': { type: 'string', default: '' },
    trace: { type: 'boolean', default: false }
  }
})

/** The scenarios as a table: letter, name, what it measures, its goal. */
function listScenarios (): string {
  const rows = [['', 'scenario', 'measures', 'goal'], ...SCENARIOS.map((s) => [s.letter, s.name, s.measures, s.goal])]
  const widths = [0, 1].map((col) => Math.max(...rows.map((r) => r[col].length)))
  return rows.map((r) => `${r[0].padEnd(widths[0])}  ${r[1].padEnd(widths[1])}  ${r[2]}\n${' '.repeat(widths[0] + widths[1] + 4)}goal: ${r[3]}`).slice(1).join('\n') + '\n'
}

async function main (): Promise<void> {
  if (args.list) {
    process.stdout.write(listScenarios())
    return
  }
  const only = new Set(args.only.split(','))
  const unknown = [...only].filter((x) => !SCENARIOS.some((s) => s.letter === x))
  if (unknown.length > 0) throw new Error(`no scenario ${unknown.join(', ')} (--list names them)`)
  const selected = SCENARIOS.filter((s) => only.has(s.letter))
  const windowMs = Math.round(Number(args.seconds) * 1000)
  const redisUrl = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379'
  const prefix = `maestro-bench:${randomUUID().slice(0, 8)}:`

  pids.redis = await redisPid(redisUrl)
  const dir = await mkdtemp(join(tmpdir(), 'maestro-bench-'))
  const report: Report = {
    lines: [],
    goals: [],
    summary: {
      machine: { cpus: cpus().length, loadavg1m: Number(loadavg()[0].toFixed(2)), node: process.version },
      gateway: { process: 'child', leases: 'redis', inventory: 'file', logLevel: args['log-level'] },
      windowSeconds: windowMs / 1000
    }
  }
  const ctx: BenchContext = {
    windowMs,
    redisUrl,
    prefix,
    dir,
    logLevel: args['log-level'],
    report,
    trace: args.trace,
    profile: args.profile,
    gatewayNodeOptions: args['gateway-node-options']
  }
  try {
    if (selected.some((s) => s.fleet != null)) {
      ctx.fleet = await GatewayFleet.start(ctx, { floors: selected.some((s) => s.floors === true) })
      // ((d), (e) measure the engine in this process, and (j) a gateway of its own, warmed in its first run.)
      if (selected.some((s) => s.fleet === 'warm')) await ctx.fleet.warmUp()
    }
    for (const scenario of selected) {
      if (scenario.floors !== true) await ctx.fleet?.stopFloors()
      await scenario.run(ctx)
    }
  } finally {
    await ctx.fleet?.close()
    await deleteKeys(redisUrl, prefix)
    closeScriptWork()
    await rm(dir, { recursive: true, force: true })
  }

  printReport(`AI Maestro gateway benchmark: ${cpus().length} cores, gateway LOG_LEVEL=${args['log-level']}, ${windowMs / 1000} s measured per scenario (CPU 'others' = the rest of the machine)`, report)
}

await main()
