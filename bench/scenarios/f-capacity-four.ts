import { cpuText } from '../cpu.js'
import { WIDE_TOKEN_MS, WIDE_TOKENS } from '../fleet.js'
import { WAITERS, WIDE, generate, merged, type Run } from '../gateway-fleet.js'
import { percentile } from '../load.js'
import { fmt } from '../report.js'
import type { Scenario } from '../scenario.js'

const GOALS = { capacityRatio: 0.9 }

export const scenario: Scenario = {
  letter: 'f',
  name: 'a capacity-4 server',
  measures: '16 clients on a server with 4 parallel slots: requests/s through the gateway vs direct',
  goal: 'gateway ≥ 0.9× direct',
  fleet: 'warm',
  run: async (ctx) => {
    const fleet = ctx.fleet!
    const { lines, goals, summary } = ctx.report
    const { windowMs } = ctx
    const measure = fleet.measure.bind(fleet)
    const gw = fleet.gateway.url
    const direct = fleet.direct
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
}
