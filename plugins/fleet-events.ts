import { hostname } from 'node:os'
import fp from 'fastify-plugin'
import { Counter, Gauge } from 'prom-client'
import type { FastifyInstance } from 'fastify'
import { FleetEventHub } from '../services/fleet/fleet-events.js'
import { buildFleetSnapshot, type UpstreamHealth, type UpstreamHealthState } from '../services/fleet/fleet-snapshot.js'
import { RECENT_REQUESTS_LIMIT } from '../services/clients/recent-requests.js'
import { ReplicaPresence } from '../services/leases/replica-presence.js'

export interface FleetEvents {
  /** The fleet's state as events, one source for every open console page of this instance. */
  hub: FleetEventHub
  /** A lease changed outside the lease manager's view (a reservation released by id or GPU): tell every replica. */
  changed: () => void
}

declare module 'fastify' {
  interface FastifyInstance {
    fleetEvents: FleetEvents
  }
}

/** Lease changes here are announced to every replica at most this often (then once more, trailing). */
const NOTICE_GAP_MS = 100

/**
 * An assignment's upstream as this replica knows it, in the console's words: the background
 * poll's health and loaded models (`fastify.upstreams`), and `cooling` while the proxy sits it out
 * after a refused connection (`fastify.upstreamCooldowns`). Both are looked up when the state is
 * read, so plugin order does not matter; nothing for an upstream the poll does not cover.
 */
function upstreamHealthOf (fastify: FastifyInstance, id: string): UpstreamHealth | undefined {
  const s = fastify.hasDecorator('upstreams') ? fastify.upstreams.snapshot(id) : undefined
  const cooling = fastify.hasDecorator('upstreamCooldowns') && fastify.upstreamCooldowns.cooling(id, Date.now())
  if (s == null) return cooling ? { health: 'cooling' } : undefined
  return {
    health: cooling ? 'cooling' : HEALTH_STATES.includes(s.health as UpstreamHealthState) ? s.health as UpstreamHealthState : 'unknown',
    loaded: Array.isArray(s.loaded) ? [...s.loaded] : undefined
  }
}

const HEALTH_STATES: UpstreamHealthState[] = ['up', 'cooling', 'unreachable', 'unknown']

/**
 * Builds the console's snapshot from what every replica shares (the lease store, the recent
 * requests list, the replicas' presence) and tells every replica, over Redis pub/sub, when a
 * lease changed here, so pages open on any of them update at once rather than at the next read.
 */
export default fp(async function fleetEvents (fastify) {
  const config = fastify.maestroConfig
  const leases = fastify.leases
  const store = leases.store
  const redis = fastify.leaseRedis
  const channel = config.redisKeyPrefix + 'fleet'
  const presence = new ReplicaPresence({
    client: redis?.client ?? null,
    key: config.redisKeyPrefix + 'replicas',
    self: { id: store.replicaId, host: hostname(), pid: process.pid },
    onError: (err) => fastify.log.debug({ err }, 'replica presence not written')
  })
  // The admin API comes with its own routes; the page offers the changes this gateway has.
  const admin = { resources: [] as string[], token: config.adminToken != null }
  fastify.addHook('onRoute', (route) => {
    const resource = /\/admin\/([a-z-]+)$/.exec(route.url)?.[1]
    if (resource !== undefined && route.method === 'GET' && !admin.resources.includes(resource)) admin.resources.push(resource)
  })

  const hub = new FleetEventHub({
    build: async () => {
      const inventory = fastify.inventory.current
      const gpuIds = inventory.snapshot.gpus.map((g) => g.id)
      const [status, recent, replicas] = await Promise.all([
        store.status(gpuIds),
        fastify.recentRequests.list(),
        presence.list()
      ])
      // the same read feeds the GPU timeline (the Usage view), which then skips its own
      fastify.gpuTimeline.observe(Date.now(), gpuIds, status)
      return buildFleetSnapshot({
        inventory: inventory.snapshot,
        status,
        recent,
        recentLimit: RECENT_REQUESTS_LIMIT,
        replicas,
        replica: store.replicaId,
        store: store.kind,
        admin,
        now: Date.now(),
        upstreamHealth: (id) => upstreamHealthOf(fastify, id)
      })
    },
    onError: (err) => fastify.log.warn({ err }, 'fleet state could not be read for the console')
  })

  // A lease granted or released here: every replica's hub reads the state again (this one too).
  let lastNotice = -Infinity
  let trailing: NodeJS.Timeout | undefined
  const notice = (): void => {
    if (redis == null) {
      hub.poke()
      return
    }
    const now = performance.now()
    if (now - lastNotice >= NOTICE_GAP_MS) {
      lastNotice = now
      redis.client.publish(channel, '1').catch(() => { hub.poke() })
    } else if (trailing == null) {
      trailing = setTimeout(() => { trailing = undefined; notice() }, NOTICE_GAP_MS - (now - lastNotice))
      trailing.unref()
    }
  }
  const observed = leases.observer
  leases.observer = {
    granted: (lease) => { observed?.granted(lease); notice() },
    released: (lease) => { observed?.released(lease); notice() },
    lost: (lease) => { observed?.lost(lease); notice() }
  }

  if (redis != null) {
    redis.subscriber.on('message', (from: string) => { if (from === channel) hub.poke() })
    await redis.subscriber.subscribe(channel)
  }
  await presence.start()

  const registers = [fastify.metrics.registry]
  new Gauge({ name: 'maestro_event_stream_readers', help: 'Open GET /gpu/events streams on this replica (console pages)', registers, collect () { this.set(hub.size) } })
  const reads = new Counter({ name: 'maestro_fleet_state_reads_total', help: 'Fleet state reads for the event streams (one per interval or change while anyone listens, whatever their number)', registers })
  hub.onBuild = () => { reads.inc() }

  fastify.decorate('fleetEvents', { hub, changed: notice })
  // Open streams would hold the server open: end them first (their pages reconnect elsewhere).
  fastify.addHook('preClose', async () => { hub.close() })
  fastify.addHook('onClose', async () => {
    clearTimeout(trailing)
    await presence.close()
  })
}, { name: 'fleet-events', dependencies: ['config', 'redis', 'gpu-lease', 'gpu-timeline', 'inventory', 'recent-requests', 'metrics'], fastify: '5.x' })
