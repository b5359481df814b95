/**
 * Closed-loop HTTP clients: each client sends one request, reads the whole answer, sends the next.
 * The same code and the same keep-alive agent settings drive the direct and the gateway runs, so
 * the client's own cost is the same on both sides of a comparison.
 */
import http from 'node:http'
import { performance } from 'node:perf_hooks'

export interface Target {
  url: URL
  body: string
}

export interface LoadResult {
  /** Requests completed inside the measured window. */
  completed: number
  /** Answers other than 200 or failed requests, over the whole run including warm-up. */
  errors: number
  firstError?: string
  /** Length of the measured window, ms. */
  windowMs: number
  /** Latency of each request completed inside the window, ms. */
  latencies: number[]
  requestsPerSecond: number
}

export interface LoadOptions {
  /** One target per client. */
  targets: Target[]
  warmupMs: number
  durationMs: number
  /** Called when the measured window opens and closes (to reset and read the simulator's recorder). */
  onWindowStart?: () => Promise<void>
  onWindowEnd?: () => Promise<void>
}

async function post (agent: http.Agent, target: Target, headers: http.OutgoingHttpHeaders): Promise<number> {
  return await new Promise<number>((resolve, reject) => {
    const req = http.request(target.url, { agent, method: 'POST', headers }, (res) => {
      res.on('data', () => {})
      res.once('end', () => resolve(res.statusCode ?? 0))
      res.once('error', reject)
    })
    req.once('error', reject)
    req.end(target.body)
  })
}

export async function closedLoop (opts: LoadOptions): Promise<LoadResult> {
  const agent = new http.Agent({ keepAlive: true, maxSockets: opts.targets.length })
  const latencies: number[] = []
  let errors = 0
  let firstError: string | undefined
  let measuring = false
  let stopping = false

  const client = async (target: Target): Promise<void> => {
    const headers = { 'content-type': 'application/json', 'content-length': Buffer.byteLength(target.body) }
    while (!stopping) {
      const started = performance.now()
      try {
        const status = await post(agent, target, headers)
        if (status !== 200) {
          errors++
          firstError ??= `HTTP ${status} from ${target.url.href}`
          continue
        }
      } catch (err) {
        errors++
        firstError ??= `${(err as Error).message} from ${target.url.href}`
        continue
      }
      if (measuring) latencies.push(performance.now() - started)
    }
  }

  const running = opts.targets.map(client)
  await sleep(opts.warmupMs)
  await opts.onWindowStart?.()
  latencies.length = 0
  measuring = true
  const windowStart = performance.now()
  await sleep(opts.durationMs)
  measuring = false
  const windowMs = performance.now() - windowStart
  await opts.onWindowEnd?.()
  stopping = true
  await Promise.all(running)
  agent.destroy()
  return { completed: latencies.length, errors, firstError, windowMs, latencies, requestsPerSecond: latencies.length / windowMs * 1000 }
}

export async function sleep (ms: number): Promise<void> {
  await new Promise((resolve) => setTimeout(resolve, ms))
}

/** Nearest-rank percentile (p in 0..100) of unsorted values; NaN when there are none. */
export function percentile (values: number[], p: number): number {
  if (values.length === 0) return NaN
  const sorted = [...values].sort((a, b) => a - b)
  const rank = Math.ceil(p / 100 * sorted.length)
  return sorted[Math.min(sorted.length, Math.max(1, rank)) - 1]
}

export function mean (values: number[]): number {
  return values.length === 0 ? NaN : values.reduce((a, b) => a + b, 0) / values.length
}
