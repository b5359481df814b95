import type { RedisConnection } from '../config/redis-connections.js'
import type { ReplicaView } from '../fleet/fleet-snapshot.js'

export interface ReplicaPresenceOptions {
  /** null: one process, no one else to know about */
  client: RedisConnection | null
  /** a sorted set (member → last heartbeat), under the gateway's key prefix */
  key: string
  self: { id: string, host: string, pid: number }
  heartbeatMs?: number
  onError?: (err: unknown) => void
}

/**
 * Which gateway replicas are alive, for the console: each replica stamps its member of one sorted
 * set every `heartbeatMs` and drops members older than three beats. One key, so it stays within
 * one Redis Cluster slot like every other key under the prefix.
 */
export class ReplicaPresence {
  private timer?: NodeJS.Timeout
  private readonly member: string
  private readonly heartbeatMs: number

  constructor (private readonly opts: ReplicaPresenceOptions) {
    this.member = JSON.stringify(opts.self)
    this.heartbeatMs = opts.heartbeatMs ?? 2000
  }

  private get aliveMs (): number {
    return this.heartbeatMs * 3
  }

  async start (): Promise<void> {
    if (this.opts.client == null) return
    await this.beat()
    this.timer = setInterval(() => { void this.beat() }, this.heartbeatMs)
    this.timer.unref()
  }

  private async beat (): Promise<void> {
    const client = this.opts.client
    if (client == null) return
    const now = Date.now()
    try {
      await client.multi()
        .zadd(this.opts.key, now, this.member)
        .zremrangebyscore(this.opts.key, '-inf', now - this.aliveMs)
        .exec()
    } catch (err) {
      this.opts.onError?.(err)
    }
  }

  async list (): Promise<ReplicaView[]> {
    const client = this.opts.client
    if (client == null) return [{ ...this.opts.self }]
    const raw = await client.zrangebyscore(this.opts.key, Date.now() - this.aliveMs, '+inf')
    const out: ReplicaView[] = []
    for (let i = 0; i < raw.length; i++) {
      try {
        const self = JSON.parse(raw[i]) as { id?: unknown, host?: unknown, pid?: unknown }
        if (typeof self.id !== 'string') continue
        out.push({
          id: self.id,
          host: typeof self.host === 'string' ? self.host : undefined,
          pid: typeof self.pid === 'number' ? self.pid : undefined
        })
      } catch {
        // not ours; skip it
      }
    }
    return out.sort((a, b) => a.id < b.id ? -1 : a.id > b.id ? 1 : 0)
  }

  async close (): Promise<void> {
    clearInterval(this.timer)
    if (this.opts.client?.status === 'ready') await this.opts.client.zrem(this.opts.key, this.member).catch(() => {})
  }
}
