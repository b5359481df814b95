import type { RedisConnection } from '../config/redis-connections.js'

/** One finished request that named a model, as the console lists it. */
export interface RecentRequest {
  /** when it finished (ISO time) */
  at: string
  /** the route's path pattern, e.g. `/api/chat` */
  route?: string
  model: string
  /** the API key's name (clients), when the request was made with one */
  client?: string
  status: number
  queueMs?: number
  upstreamMs?: number
  assignment?: string
}

/** A finished request as it is added: `at` in ms since the epoch (made ISO text only for those listed). */
export type FinishedRequest = Omit<RecentRequest, 'at'> & { at: number }

const listed = (entry: FinishedRequest): RecentRequest => ({ ...entry, at: new Date(entry.at).toISOString() })

/** The last requests of the whole fleet, newest first. */
export interface RecentRequests {
  add: (entry: FinishedRequest) => void
  list: () => Promise<RecentRequest[]>
  close: () => Promise<void>
}

export const RECENT_REQUESTS_LIMIT = 30

/** One process (embedded mode): a ring in memory. */
export class MemoryRecentRequests implements RecentRequests {
  /** oldest first; trimmed to the newest `limit` once it holds twice that (not on every request) */
  private entries: FinishedRequest[] = []

  constructor (private readonly limit = RECENT_REQUESTS_LIMIT) {}

  add (entry: FinishedRequest): void {
    this.entries.push(entry)
    if (this.entries.length >= 2 * this.limit) this.entries = this.entries.slice(-this.limit)
  }

  async list (): Promise<RecentRequest[]> {
    return this.entries.slice(-this.limit).reverse().map(listed)
  }

  async close (): Promise<void> {}
}

export interface RedisRecentRequestsOptions {
  client: RedisConnection
  /** the list's key (under the gateway's key prefix) */
  key: string
  limit?: number
  /** how often buffered entries are written; one round trip per flush, not per request */
  flushMs?: number
  onError?: (err: unknown) => void
}

/**
 * Every replica's requests in one capped Redis list. Entries are buffered and written together
 * (LPUSH + LTRIM in one transaction) so the request path never waits on Redis and a busy gateway
 * makes a handful of writes a second, whatever its request rate.
 */
export class RedisRecentRequests implements RecentRequests {
  private buffer: FinishedRequest[] = []
  private timer?: NodeJS.Timeout
  private readonly limit: number
  private readonly flushMs: number

  constructor (private readonly opts: RedisRecentRequestsOptions) {
    this.limit = opts.limit ?? RECENT_REQUESTS_LIMIT
    this.flushMs = opts.flushMs ?? 100
  }

  add (entry: FinishedRequest): void {
    this.buffer.push(entry)
    // Only the newest `limit` can ever be listed: a buffer that could not be written stays bounded
    // (trimmed once it holds twice that, not on every request).
    if (this.buffer.length >= 2 * this.limit) this.buffer = this.buffer.slice(-this.limit)
    if (this.timer == null) {
      this.timer = setTimeout(() => { void this.flush() }, this.flushMs)
      this.timer.unref()
    }
  }

  async flush (): Promise<void> {
    this.timer = undefined
    if (this.buffer.length === 0) return
    const entries = this.buffer.slice(-this.limit)
    this.buffer = []
    try {
      await this.opts.client.multi()
        .lpush(this.opts.key, ...entries.map((e) => JSON.stringify(listed(e))))
        .ltrim(this.opts.key, 0, this.limit - 1)
        .exec()
    } catch (err) {
      // The record is for people watching; a Redis outage loses a few lines, nothing else.
      this.opts.onError?.(err)
    }
  }

  async list (): Promise<RecentRequest[]> {
    const raw = await this.opts.client.lrange(this.opts.key, 0, this.limit - 1)
    const out: RecentRequest[] = []
    for (const line of raw) {
      try {
        const entry = JSON.parse(line) as RecentRequest
        if (entry != null && typeof entry === 'object' && typeof entry.at === 'string') out.push(entry)
      } catch {
        // not ours; skip it
      }
    }
    return out
  }

  async close (): Promise<void> {
    clearTimeout(this.timer)
    await this.flush()
  }
}
