import { cpuText, type Role } from '../cpu.js'
import { GPUS, generate, type Run } from '../gateway-fleet.js'
import { percentile, type Target } from '../load.js'
import { scriptSummary, scriptText } from '../redis-work.js'
import { fmt } from '../report.js'
import type { Scenario } from '../scenario.js'

const GOALS = { nginxRatio: 0.35 }

export const scenario: Scenario = {
  letter: 'a',
  name: '64 GPUs, 64 clients',
  measures: 'requests/s, latency and proxy CPU per request: direct vs nginx vs gateway, beside the floors',
  goal: 'gateway ≥ 0.35× nginx',
  fleet: 'warm',
  floors: true,
  run: async (ctx) => {
    const fleet = ctx.fleet!
    const { lines, goals, summary } = ctx.report
    const all = Array.from({ length: GPUS }, (_, i) => i)
    const clients = (url: (i: number) => string): Target[] => all.map((i) => generate(url(i), i))
    process.stderr.write(`bench: (a) ${GPUS} GPUs, ${GPUS} clients\n`)
    const { direct: d, nginx: n, gateway: g, memory: m, bare: b } = await fleet.alternate({
      direct: clients(fleet.direct),
      nginx: clients(fleet.viaNginx),
      gateway: clients(() => fleet.gateway.url),
      memory: clients(() => fleet.inMemory),
      bare: clients(() => fleet.bare)
    }, 2, { warmupMs: 500, durationMs: ctx.windowMs / 2 })
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
}
