import type { FastifyPluginAsync, FastifyRequest } from 'fastify'
import { GatewayError } from '../../services/http/errors.js'
import type { ModelKind } from '../../services/fleet/inventory.js'
import { candidatesOf, queueLabel, queueName, type StoreStatus } from '../../services/leases/lease-store.js'
import { modelKey } from '../../services/fleet/model-name.js'
import gpuEvents from './events.js'
import {
  CacheCleared, FleetStatus, LeaseRef, Message, Reservation, ReserveRequest, type OutputType
} from './schemas.js'

const KIND_OF_OUTPUT: Record<OutputType, ModelKind> = { text: 'llm', images: 'diffusor', speech: 'speech' }

/*
 * Who may call what (plugins/auth.ts): the lease API's writes need the admin token when
 * ADMIN_TOKEN is set (else a key when keys are in use); cache clearing is an admin route; the
 * status is open. (`errorStyle` is the default, stated so these objects type-check with or
 * without the auth plugin's `auth` in the route config type.)
 */
const leaseHolders = { auth: 'lease', errorStyle: 'ollama' } as const
const adminOnly = { auth: 'admin', errorStyle: 'ollama' } as const
const openToAll = { auth: 'open', errorStyle: 'ollama' } as const

const iso = (ms: number | undefined): string | undefined => ms == null ? undefined : new Date(ms).toISOString()

/**
 * The lease API of the original ai-maestro proxy, plus lease ids: reserve a model's GPUs for work
 * done outside the gateway, keep them with pings, give them back; see who holds what; clear the
 * inventory cache.
 */
const gpuRoutes: FastifyPluginAsync = async (fastify) => {
  const ttlMs = fastify.maestroConfig.leaseTtlMs
  const store = fastify.leases.store
  await fastify.register(gpuEvents)

  /** A lease store that cannot be reached answers 503, as it does for proxied requests. */
  const fromStore = async <T>(work: Promise<T>): Promise<T> => {
    try {
      return await work
    } catch (err) {
      fastify.log.warn({ err }, 'lease store call failed')
      throw new GatewayError(503, 'lease store unavailable', 1)
    }
  }

  fastify.post('/gpu/reserve', { schema: { body: ReserveRequest, response: { 200: Reservation } }, config: leaseHolders }, async (request, reply) => {
    const { outputType, model: asked } = request.body as ReserveRequest
    const kind = KIND_OF_OUTPUT[outputType]
    // An alias reserves a server of its target (CONTRACT 17), checked against the key's list as its alias.
    const aliasTarget = fastify.inventory.current.aliasTarget(asked)
    const model = aliasTarget ?? asked
    const candidates = fastify.inventory.current.candidateList(model, kind)
    if (candidates.length === 0) throw new GatewayError(404, `model '${asked}' not found`)
    // The key's `models` and limits, as for a proxied request (403 / 429). This admission ends with
    // the exchange; the reservation's own hold (below) keeps its slot from then on.
    const pass = await fastify.admitClient(request, asked, aliasTarget)
    // The same queue as proxied requests for the model: a reservation waits its turn among them.
    const lease = await fastify.leases.acquire({
      queue: queueName(kind, modelKey(model)),
      candidates: candidatesOf(candidates),
      info: { model, kind, purpose: 'reservation' },
      requester: request.exchange,
      client: { id: request.client.id, priority: request.client.priority }
    })
    pass.granted(lease.queuedMs)
    // Renewing right away makes `expiresAt` a time the lease is sure to last until.
    const renewedAt = Date.now()
    let kept = false
    try {
      const renewed = await fastify.leases.ping(lease.token)
      if (renewed != null && !request.exchange.closed) {
        // Its client's slot and its ownership, until released or expired with the lease (same ttl).
        await fastify.clientLimits.holdReservation(request.client, lease.token)
        kept = !request.exchange.closed
      }
    } catch (err) {
      request.log.warn({ err }, 'reservation could not be renewed or held')
    }
    if (!kept) {
      // Nobody will ping or release it (client gone), or it cannot be vouched for: give it back.
      await fastify.leases.releaseReservation(lease.token).catch(() => {})
      await fastify.clientLimits.releaseReservation(request.client.id, lease.token)
      if (request.exchange.closed) throw new GatewayError(499, 'client closed request')
      throw new GatewayError(503, 'lease store unavailable', 1)
    }
    const assignment = candidates[lease.candidateIndex]
    request.log.info({ leaseId: lease.token, model, assignment: assignment.name, gpus: lease.gpuIds }, 'GPUs reserved')
    reply.header('x-maestro-queue-ms', lease.queuedMs.toFixed(1))
    return {
      name: assignment.name,
      ip: assignment.ip,
      port: assignment.port,
      gpuIds: lease.gpuIds.join(','),
      leaseId: lease.token,
      expiresAt: new Date(renewedAt + ttlMs).toISOString()
    }
  })

  /** Ping and release name exactly one of: a lease by id, or whatever leases hold the given GPUs. */
  const targetOf = (body: LeaseRef): { leaseId?: string, gpuIds?: string[] } => {
    if ((body.leaseId == null) === (body.gpuIds == null)) throw new GatewayError(400, 'give either leaseId or gpuIds')
    return { leaseId: body.leaseId, gpuIds: body.gpuIds?.map(String) }
  }

  /**
   * Whose leases the caller may ping and release (CONTRACT 18): with keys configured, a key (or a
   * caller without one) only the reservations it made; the admin token, or anyone when no key is
   * configured, any. Answers the client id to hold to, undefined for any.
   */
  const onlyHeldBy = (request: FastifyRequest): string | undefined =>
    request.credential === 'admin' || !fastify.apiKeys.configured ? undefined : request.client.id

  /** The holder of each token (client id; undefined for none: a request in flight, or an expired hold). */
  const holdersOf = async (tokens: string[]): Promise<Map<string, string | undefined>> => {
    const holders = await fromStore(fastify.clientLimits.reservationHolders(tokens))
    return new Map(tokens.map((token, i) => [token, holders[i]]))
  }

  /** The leases on each GPU that the caller may act on (someone else's is as if it were not there). */
  const leasesOnGpus = async (request: FastifyRequest, ids: string[]): Promise<{ tokens: string[][], holders: Map<string, string | undefined> }> => {
    const tokens = await fromStore(store.tokensOf(ids))
    const holders = await holdersOf([...new Set(tokens.flat())])
    const only = onlyHeldBy(request)
    return { tokens: only == null ? tokens : tokens.map((list) => list.filter((token) => holders.get(token) === only)), holders }
  }

  fastify.post('/gpu/ping', { schema: { body: LeaseRef, response: { 200: Message } }, config: leaseHolders }, async (request) => {
    const { leaseId, gpuIds } = targetOf(request.body as LeaseRef)
    if (leaseId != null) {
      const holder = (await holdersOf([leaseId])).get(leaseId)
      const only = onlyHeldBy(request)
      // Someone else's lease answers exactly as an unknown one (ids cannot be probed), and is not renewed.
      if ((only != null && holder !== only) || await fromStore(fastify.leases.ping(leaseId)) == null) {
        throw new GatewayError(404, `no live lease '${leaseId}'`)
      }
      if (holder != null) await fromStore(fastify.clientLimits.renewReservation(holder, leaseId))
      return { message: 'Ping successful' }
    }
    const ids = gpuIds as string[]
    const { tokens, holders } = await leasesOnGpus(request, ids)
    const free = ids.filter((_, i) => tokens[i].length === 0)
    if (free.length > 0) throw new GatewayError(404, `no live lease on GPU ${free.join(', ')}`)
    for (const token of new Set(tokens.flat())) {
      if (await fromStore(fastify.leases.ping(token)) == null) throw new GatewayError(404, `the lease on GPU ${ids.join(', ')} has just ended`)
      const holder = holders.get(token)
      if (holder != null) await fromStore(fastify.clientLimits.renewReservation(holder, token))
    }
    return { message: 'Ping successful' }
  })

  fastify.post('/gpu/release', { schema: { body: LeaseRef, response: { 200: Message } }, config: leaseHolders }, async (request) => {
    const { leaseId, gpuIds } = targetOf(request.body as LeaseRef)
    const only = onlyHeldBy(request)
    if (leaseId != null) {
      const holder = (await holdersOf([leaseId])).get(leaseId)
      // Someone else's lease answers exactly as an unknown one, and stays.
      if (only != null && holder !== only) throw new GatewayError(404, `no live lease '${leaseId}'`)
      const released = await fromStore(fastify.leases.releaseReservation(leaseId))
      if (holder != null) await fastify.clientLimits.releaseReservation(holder, leaseId)
      if (!released) throw new GatewayError(404, `no live lease '${leaseId}'`)
      fastify.fleetEvents.changed()
      request.log.info({ leaseId }, 'lease released')
      return { message: 'GPU released successfully' }
    }
    const ids = gpuIds as string[]
    const { tokens, holders } = await leasesOnGpus(request, ids)
    if (only != null) {
      // The caller's own reservations on these GPUs, each once; anything else on them stays.
      let released = 0
      for (const token of new Set(tokens.flat())) {
        if (await fromStore(fastify.leases.releaseReservation(token))) released++
        await fastify.clientLimits.releaseReservation(only, token)
      }
      if (released === 0) throw new GatewayError(404, `no live lease on GPU ${ids.join(', ')}`)
      fastify.fleetEvents.changed()
      request.log.info({ gpus: ids, released }, 'GPUs released')
      return { message: 'GPU released successfully' }
    }
    // A GPU serving a request in flight stays that request's until it ends: freeing it would put
    // a second request on it. Only reservations are released by GPU id.
    const { released, inFlight } = await fromStore(store.releaseGpus(ids))
    // Every reservation on these GPUs is gone now: so are their holders' slots.
    for (const [token, holder] of holders) if (holder != null) await fastify.clientLimits.releaseReservation(holder, token)
    if (released > 0) fastify.fleetEvents.changed()
    if (released === 0 && inFlight.length > 0) {
      throw new GatewayError(409, `GPU ${inFlight.join(', ')} is serving a request in flight; it is freed when that request ends`)
    }
    if (released === 0) throw new GatewayError(404, `no live lease on GPU ${ids.join(', ')}`)
    request.log.info({ gpus: ids, released }, 'GPUs released')
    return { message: 'GPU released successfully' }
  })

  /*
   * The route is open: one store call serves every status asked for within STATUS_CACHE_MS (the
   * call itself is bounded: the inventory's GPUs, at most STATUS_QUEUES_LIMIT queues).
   */
  const STATUS_CACHE_MS = 250
  let cached: { at: number, inventory: unknown, state: Promise<StoreStatus> } | undefined
  const currentStatus = async (gpuIds: string[]): Promise<StoreStatus> => {
    const now = performance.now()
    const inventory = fastify.inventory.current
    if (cached == null || now - cached.at > STATUS_CACHE_MS || cached.inventory !== inventory) {
      const state = store.status(gpuIds)
      cached = { at: now, inventory, state }
      state.catch(() => { if (cached?.state === state) cached = undefined })
    }
    return await cached.state
  }

  fastify.get('/gpu/status', { schema: { response: { 200: FleetStatus } }, config: openToAll }, async (): Promise<FleetStatus> => {
    const inventory = fastify.inventory.current
    const gpus = inventory.snapshot.gpus
    const state = await fromStore(currentStatus(gpus.map((g) => g.id)))
    const leased = new Map(state.gpus.map((g) => [g.gpuId, g]))
    // A free GPU's capacity: that of the assignments on it (the largest, when several share it).
    const capacityOn = new Map<string, number>()
    for (const a of inventory.snapshot.assignments) {
      for (const g of a.gpuIds) capacityOn.set(g, Math.max(capacityOn.get(g) ?? 1, a.capacity ?? 1))
    }
    return {
      gpus: gpus.map((gpu) => {
        const lease = leased.get(gpu.id)
        const base = {
          id: gpu.id,
          name: gpu.name,
          computer: gpu.computerName,
          leased: lease != null,
          slotsUsed: lease?.slotsUsed ?? 0,
          capacity: lease?.capacity ?? capacityOn.get(gpu.id) ?? 1
        }
        if (lease == null) return base
        return {
          ...base,
          model: lease.model,
          assignment: lease.assignmentId == null ? undefined : inventory.assignment(lease.assignmentId)?.name ?? lease.assignmentId,
          purpose: lease.purpose,
          since: iso(lease.since),
          expiresAt: iso(lease.expiresAt)
        }
      }),
      waiting: Object.entries(state.queues).map(([queue, depth]) => {
        // `<kind>:<model key>`; the model key may itself hold colons (tags).
        const label = queueLabel(queue)
        const colon = label.indexOf(':')
        return { kind: label.slice(0, colon), model: label.slice(colon + 1), depth, oldestSince: iso(state.queueSince[queue]) }
      }),
      holds: Object.keys(state.holds)
    }
  })

  const clearCache = async (): Promise<{ removed: number }> => {
    const shared = await fromStore(fastify.inventory.clearShared())
    await fastify.inventory.reload()
    // A key revoked in the table stops working here before the answer (other replicas: below).
    await fastify.apiKeys.reload()
    // Every other replica reads its source again too (this one hears it as well; a second read is harmless).
    await fromStore(store.publishInventoryChanged())
    const health = fastify.inventory.health()
    if (!health.ok) throw new GatewayError(503, `cache cleared, but the inventory could not be read again: ${health.error ?? 'unknown error'}`)
    // The shared copy (Redis) and this replica's own snapshot.
    return { removed: shared + 1 }
  }
  for (const url of ['/gpu/cache', '/cache']) {
    fastify.delete(url, { schema: { response: { 200: CacheCleared } }, config: adminOnly }, clearCache)
  }
}

export default gpuRoutes
