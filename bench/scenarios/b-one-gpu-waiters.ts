import { cpuText } from '../cpu.js'
import { benchGpuId, type SimulatorReply } from '../fleet.js'
import { WAITERS, generate, traceLines } from '../gateway-fleet.js'
import { mean, percentile } from '../load.js'
import { scriptSummary, scriptText } from '../redis-work.js'
import { fmt } from '../report.js'
import type { Scenario } from '../scenario.js'
import type { TraceSummary } from '../trace.js'

const GOALS = { gapP50Ms: 0.3, gapP99Ms: 1.5, fifoRatio: 2 }

export const scenario: Scenario = {
  letter: 'b',
  name: 'one GPU, 16 waiting clients',
  measures: "the GPU idle gap between requests, and the clients' p99 against strict FIFO",
  goal: 'idle gap p50 ≤ 0.3 ms, p99 ≤ 1.5 ms; p99 ≤ 2× strict FIFO',
  fleet: 'warm',
  floors: true,
  run: async (ctx) => {
    const fleet = ctx.fleet!
    const { lines, goals, summary } = ctx.report
    const { windowMs } = ctx
    const measure = fleet.measure.bind(fleet)
    const gw = fleet.gateway.url
    const inMemory = fleet.inMemory
    const sims = fleet.sims
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
}
