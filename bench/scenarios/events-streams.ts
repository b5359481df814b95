import http from 'node:http'
import { cpuText } from '../cpu.js'
import { EVENT_STREAMS, GPUS, generate, merged, type Run } from '../gateway-fleet.js'
import { percentile } from '../load.js'
import { fmt } from '../report.js'
import type { Scenario } from '../scenario.js'

const GOALS = { eventStreamsRatio: 0.95 }

/**
 * `n` open event streams, read and thrown away as a browser's EventSource would read them. The
 * gateway lets one address hold 10: every 10 come from their own loopback address (127.0.0.2 on;
 * Linux answers the whole 127.0.0.0/8 on its loopback interface).
 */
async function openEventStreams (url: string, n: number): Promise<{ bytes: () => number, close: () => void }> {
  const agent = new http.Agent({ keepAlive: false, maxSockets: n })
  const requests: http.ClientRequest[] = []
  let bytes = 0
  await Promise.all(Array.from({ length: n }, async (_, i) => await new Promise<void>((resolve, reject) => {
    const req = http.get(new URL('/gpu/events', url), { agent, localAddress: `127.0.0.${2 + Math.floor(i / 10)}` }, (res) => {
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

export const scenario: Scenario = {
  letter: 'events',
  name: '200 event streams',
  measures: "(a)'s load with and without 200 open GET /gpu/events streams (only when asked for)",
  goal: 'throughput kept ≥ 0.95×',
  fleet: 'warm',
  run: async (ctx) => {
    const fleet = ctx.fleet!
    const { lines, goals, summary } = ctx.report
    const { windowMs } = ctx
    const measure = fleet.measure.bind(fleet)
    const gw = fleet.gateway.url
    const all = Array.from({ length: GPUS }, (_, i) => i)
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
}
