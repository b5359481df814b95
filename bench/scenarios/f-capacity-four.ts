import { cpuText } from '../cpu.js'
import { WIDE_TOKEN_MS, WIDE_TOKENS } from '../fleet.js'
import { WAITERS, WIDE, generate } from '../gateway-fleet.js'
import { percentile, type Target } from '../load.js'
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
    process.stderr.write('bench: (f) a capacity-4 server, 16 clients\n')
    const clients = (url: string): Target[] => Array.from({ length: WAITERS }, () => generate(url, WIDE))
    const { direct: d, gateway: g } = await fleet.alternate({
      direct: clients(fleet.direct(WIDE)),
      gateway: clients(fleet.gateway.url)
    }, 2, { warmupMs: 500, durationMs: ctx.windowMs / 2 })
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
