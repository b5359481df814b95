import { cpuText } from '../cpu.js'
import { generate, merged, traceLines, type Run } from '../gateway-fleet.js'
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
    const { windowMs } = ctx
    const measure = fleet.measure.bind(fleet)
    const gw = fleet.gateway.url
    const direct = fleet.direct
    const viaNginx = fleet.viaNginx
    const inMemory = fleet.inMemory
    const bare = fleet.bare
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
}
