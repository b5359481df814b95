/**
 * The gateway's two Redis connections (commands, pub/sub) for each topology, and what `/health`
 * says about them. Commands fail fast while disconnected so no request waits on an unreachable
 * store; the subscriber has the same options with an offline queue (its subscriptions are
 * re-sent by ioredis on reconnect).
 */
import { Cluster, Redis, type ClusterOptions, type RedisOptions } from 'ioredis'
import type { RedisAuth, RedisTopology } from './config.js'

export type RedisConnection = Redis | Cluster

export interface TopologyState {
  kind: RedisTopology['kind']
  /** Sentinel or Cluster: the connection was lost and is being re-made, or grants are paused after a switch. */
  failingOver: boolean
  /** Sentinel: the master in use (`host:port`), once connected. */
  master?: string
}

interface Log {
  info: (obj: object, msg: string) => void
  warn: (obj: object, msg: string) => void
}

const COMMAND_OPTIONS = {
  enableOfflineQueue: false,
  maxRetriesPerRequest: 0,
  commandTimeout: 5000,
  // Commands issued in one tick go out in one write: under load, the lease scripts of many
  // requests share a syscall (the socket writes were the largest single cost per request).
  enableAutoPipelining: true,
  // ...but not a release: it hands the GPU to the next waiter, which must not wait for a tick.
  autoPipeliningIgnoredCommands: ['maestroRelease'],
  // Reconnect soon: after a failover the new master is found on the next attempt.
  retryStrategy: (times: number) => Math.min(times * 100, 500)
} satisfies RedisOptions

function credentials (auth: RedisAuth): RedisOptions {
  const out: RedisOptions = {}
  if (auth.username != null) out.username = auth.username
  if (auth.password != null) out.password = auth.password
  if (auth.tls) out.tls = {}
  return out
}

function sentinelOptions (topology: Extract<RedisTopology, { kind: 'sentinel' }>): RedisOptions {
  const { auth } = topology
  return {
    sentinels: topology.sentinels,
    name: topology.master,
    role: 'master',
    ...credentials(auth),
    sentinelUsername: auth.sentinelUsername,
    sentinelPassword: auth.sentinelPassword,
    enableTLSForSentinelMode: auth.sentinelTls,
    ...(auth.sentinelTls ? { sentinelTLS: {} } : {}),
    // Told by the sentinels of a switch: leave the old master at once, even while it still answers.
    failoverDetector: true,
    // A master demoted to replica answers writes with READONLY: go and find the new one.
    reconnectOnError: (err) => err.message.startsWith('READONLY')
  }
}

function clusterOptions (topology: Extract<RedisTopology, { kind: 'cluster' }>, offlineQueue: boolean): ClusterOptions {
  return {
    enableOfflineQueue: offlineQueue,
    enableReadyCheck: true,
    clusterRetryStrategy: COMMAND_OPTIONS.retryStrategy,
    redisOptions: { ...credentials(topology.auth), maxRetriesPerRequest: 0, commandTimeout: COMMAND_OPTIONS.commandTimeout }
  }
}

/** Command and subscriber connections, with the same options, for the configured topology. */
export function redisConnections (topology: RedisTopology): { client: RedisConnection, subscriber: RedisConnection } {
  switch (topology.kind) {
    case 'cluster':
      return {
        client: new Cluster(topology.nodes, clusterOptions(topology, false)),
        subscriber: new Cluster(topology.nodes, clusterOptions(topology, true))
      }
    case 'sentinel': {
      const options = { ...COMMAND_OPTIONS, ...sentinelOptions(topology) }
      return { client: new Redis(options), subscriber: new Redis({ ...options, enableOfflineQueue: true }) }
    }
    default: {
      const options = { ...COMMAND_OPTIONS, ...credentials(topology.auth) }
      return { client: new Redis(topology.url, options), subscriber: new Redis(topology.url, { ...options, enableOfflineQueue: true }) }
    }
  }
}

/**
 * Watches the command connection for `/health`: a lost connection under Sentinel or Cluster is
 * a failover in progress; after reconnecting to another server (a new `run_id`), the lease store
 * pauses grants for one lease ttl, and that counts as failing over too.
 */
export class RedisWatch {
  private everReady = false
  private serverId?: string
  private switchedAt = -Infinity
  private master?: string
  private closed = false

  constructor (private readonly topology: RedisTopology, private readonly client: RedisConnection,
    private readonly pauseMs: number, private readonly log?: Log) {
    client.on('ready', () => { void this.onReady() })
  }

  private async onReady (): Promise<void> {
    const first = !this.everReady
    this.everReady = true
    if (this.client instanceof Cluster || this.closed) return
    const stream = (this.client as unknown as { stream?: { remoteAddress?: string, remotePort?: number } }).stream
    this.master = stream?.remoteAddress != null ? `${stream.remoteAddress}:${stream.remotePort ?? ''}` : undefined
    const info = await this.client.info('server').catch(() => '')
    const id = /run_id:(\w+)/.exec(info)?.[1]
    if (id == null) return
    if (!first && id !== this.serverId) {
      this.switchedAt = performance.now()
      this.log?.warn({ topology: this.topology.kind, master: this.master }, 'reconnected to another Redis server: grants pause for one lease ttl while replicas re-assert their leases')
    } else if (!first) {
      this.log?.info({ topology: this.topology.kind, master: this.master }, 'reconnected to the same Redis server')
    }
    this.serverId = id
  }

  state (): TopologyState {
    const lost = this.everReady && this.client.status !== 'ready'
    const paused = performance.now() - this.switchedAt < this.pauseMs
    const failingOver = this.topology.kind !== 'standalone' && (lost || paused)
    return { kind: this.topology.kind, failingOver, ...(this.master != null ? { master: this.master } : {}) }
  }

  close (): void {
    this.closed = true
  }
}
