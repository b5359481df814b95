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

/** The last requests of the whole fleet, newest first. */
export interface RecentRequests {
  add: (entry: RecentRequest) => void
  list: () => Promise<RecentRequest[]>
  close: () => Promise<void>
}

export const RECENT_REQUESTS_LIMIT = 30

/** One process (embedded mode): a ring in memory. */
export class MemoryRecentRequests implements RecentRequests {
  private entries: RecentRequest[] = []

  constructor (private readonly limit = RECENT_REQUESTS_LIMIT) {}

  add (entry: RecentRequest): void {
    this.entries.unshift(entry)
    if (this.entries.length > this.limit) this.entries.length = this.limit
  }

  async list (): Promise<RecentRequest[]> {
    return [...this.entries]
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
  private buffer: RecentRequest[] = []
  private timer?: NodeJS.Timeout
  private readonly limit: number
  private readonly flushMs: number

  constructor (private readonly opts: RedisRecentRequestsOptions) {
    this.limit = opts.limit ?? RECENT_REQUESTS_LIMIT
    this.flushMs = opts.flushMs ?? 100
  }

  add (entry: RecentRequest): void {
    this.buffer.push(entry)
    // Only the newest `limit` can ever be listed: a buffer that could not be written stays bounded.
    if (this.buffer.length > this.limit) this.buffer.splice(0, this.buffer.length - this.limit)
    if (this.timer == null) {
      this.timer = setTimeout(() => { void this.flush() }, this.flushMs)
      this.timer.unref()
    }
  }

  async flush (): Promise<void> {
    this.timer = undefined
    if (this.buffer.length === 0) return
    const entries = this.buffer
    this.buffer = []
    try {
      await this.opts.client.multi()
        .lpush(this.opts.key, ...entries.map((e) => JSON.stringify(e)))
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
