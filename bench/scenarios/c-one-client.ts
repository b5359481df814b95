import { cpuText } from '../cpu.js'
import { generate, traceLines } from '../gateway-fleet.js'
import { percentile } from '../load.js'
import { scriptSummary, scriptText } from '../redis-work.js'
import { fmt } from '../report.js'
import type { Scenario } from '../scenario.js'
import type { TraceSummary } from '../trace.js'

const GOALS = { addedP50Ms: 0.4 }

export const scenario: Scenario = {
  letter: 'c',
  name: 'one client',
  measures: 'latency the gateway and nginx add to one request at a time',
  goal: 'added p50 ≤ 0.4 ms',
  fleet: 'warm',
  floors: true,
  run: async (ctx) => {
    const fleet = ctx.fleet!
    const { lines, goals, summary } = ctx.report
    process.stderr.write('bench: (c) one client\n')
    /** the last gateway run's */
    let trace: TraceSummary | undefined
    const runs = await fleet.alternate({
      direct: [generate(fleet.direct(0), 0)],
      nginx: [generate(fleet.viaNginx(0), 0)],
      gateway: { targets: [generate(fleet.gateway.url, 0)], opts: { trace: (t) => { trace = t } } },
      memory: [generate(fleet.inMemory, 0)],
      bare: [generate(fleet.bare, 0)]
    }, 3, { warmupMs: 200, durationMs: Math.max(500, Math.round(ctx.windowMs / 2)) })
    const m50 = percentile(runs.memory.latencies, 50)
    const b50 = percentile(runs.bare.latencies, 50)
    const d = runs.direct.latencies
    const n = runs.nginx.latencies
    const [n50, n99] = [percentile(n, 50), percentile(n, 99)]
    const gr = runs.gateway
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
}
