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
  /** Sentinel or Cluster: the connection (on a Cluster: to the master of the gateway's slot) was lost and is being re-made, or grants are paused after a switch. */
  failingOver: boolean
  /** The master in use (`host:port`), once connected; on a Cluster the one holding the gateway's slot. */
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
  // ...but not the lease scripts: the store batches them itself, sending the first of a turn at
  // once (a release hands the GPU to the next waiter; a request on an idle fleet should not wait
  // for the turn to end either) and the rest of the turn together (redis-lease-store.ts).
  autoPipeliningIgnoredCommands: ['maestroRelease', 'maestroAttempt'],
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

/** Asked of the master that holds KEYS[1]'s slot (the Cluster routes the script there): its run id. */
const RUN_ID_LUA = "return string.match(redis.call('INFO', 'server'), 'run_id:(%w+)') or ''"
/** Cluster: how often the master of the gateway's slot is asked for its run id (one tiny script). */
const CLUSTER_PROBE_MS = 1000
/** Cluster: a probe without an answer for this long counts as a master that does not answer. */
const CLUSTER_PROBE_STUCK_MS = 2000

/**
 * Watches the command connection for `/health`: a lost connection under Sentinel or Cluster is
 * a failover in progress; after reconnecting to another server (a new `run_id`), the lease store
 * pauses grants for one lease ttl, and that counts as failing over too.
 *
 * On a Cluster only one master matters: the one that holds the slot of the gateway's keys (they
 * share one hash tag; `slotKey` is one of them). Once a second, off the request path, a one-line
 * script sent by that key asks it for its run id; the address is ioredis's own slot map. Failing
 * over: that probe failed (connection refused, CLUSTERDOWN, timeout) or hangs, the slot is not in
 * the map, or ioredis's connection to that master is not up; and one `pauseMs` after the slot's
 * master answered with another address or run id than before (a replica promoted, a restart).
 */
export class RedisWatch {
  private everReady = false
  private serverId?: string
  private switchedAt = -Infinity
  private master?: string
  private closed = false
  // Cluster only.
  private slot?: number
  private probeTimer?: NodeJS.Timeout
  /** When the probe in flight started. */
  private probingSince?: number
  /** The last probe's outcome; undefined before the first one ended. */
  private slotOk?: boolean

  constructor (private readonly topology: RedisTopology, private readonly client: RedisConnection,
    private readonly pauseMs: number, private readonly log?: Log, private readonly slotKey = 'epoch') {
    client.on('ready', () => { void this.onReady() })
  }

  private async onReady (): Promise<void> {
    const first = !this.everReady
    this.everReady = true
    if (this.closed) return
    if (this.client instanceof Cluster) {
      if (this.probeTimer == null) {
        this.probeTimer = setInterval(() => { void this.probe() }, CLUSTER_PROBE_MS)
        this.probeTimer.unref()
      }
      await this.probe()
      return
    }
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

  /** Cluster: ask the master of the gateway's slot for its run id, and note a new master. */
  private async probe (): Promise<void> {
    const cluster = this.client as Cluster
    if (this.closed || this.probingSince != null || cluster.status !== 'ready') return
    this.probingSince = performance.now()
    try {
      this.slot ??= Number(await cluster.cluster('KEYSLOT', this.slotKey))
      const run = String(await cluster.eval(RUN_ID_LUA, 1, this.slotKey))
      const master = cluster.slots[this.slot]?.[0]
      if (this.closed) return
      if (this.serverId != null && (run !== this.serverId || master !== this.master)) {
        this.switchedAt = performance.now()
        this.log?.warn({ topology: 'cluster', slot: this.slot, master, before: this.master }, 'another Redis server holds the gateway\'s slot: grants pause for one lease ttl while replicas re-assert their leases')
      } else if (this.slotOk === false) {
        this.log?.info({ topology: 'cluster', slot: this.slot, master }, 'the master of the gateway\'s slot answers again (the same server)')
      }
      this.serverId = run
      this.master = master
      this.slotOk = true
    } catch (err) {
      if (this.slotOk !== false && !this.closed) this.log?.warn({ err, topology: 'cluster', slot: this.slot, master: this.master }, 'the Redis Cluster master of the gateway\'s slot does not answer')
      this.slotOk = false
    } finally {
      this.probingSince = undefined
    }
  }

  /** Cluster: the master of the gateway's slot cannot serve it now (from memory only: /health's cost). */
  private slotLost (cluster: Cluster): boolean {
    if (this.slotOk == null) return false
    if (!this.slotOk) return true
    if (this.probingSince != null && performance.now() - this.probingSince > CLUSTER_PROBE_STUCK_MS) return true
    const key = this.slot != null ? cluster.slots[this.slot]?.[0] : undefined
    if (key == null) return true
    const node = cluster.nodes('master').find((n) => `${n.options.host ?? ''}:${n.options.port ?? ''}` === key)
    // Not 'wait' either: after a kill, ioredis makes the lost node's connection again (lazily, in
    // 'wait') on the next MOVED to it. A healthy master is in use by the leases and the probe.
    return node == null || node.status !== 'ready'
  }

  state (): TopologyState {
    const cluster = this.client instanceof Cluster ? this.client : undefined
    const lost = this.everReady && (this.client.status !== 'ready' || (cluster != null && this.slotLost(cluster)))
    const paused = performance.now() - this.switchedAt < this.pauseMs
    const failingOver = this.topology.kind !== 'standalone' && (lost || paused)
    const master = cluster != null && this.slot != null ? cluster.slots[this.slot]?.[0] ?? this.master : this.master
    return { kind: this.topology.kind, failingOver, ...(master != null ? { master } : {}) }
  }

  close (): void {
    this.closed = true
    if (this.probeTimer != null) clearInterval(this.probeTimer)
  }
}
