import { performance } from 'node:perf_hooks'
import fp from 'fastify-plugin'
import { collectDefaultMetrics, Counter, Gauge, Histogram, Registry } from 'prom-client'
import type { FastifyReply, FastifyRequest } from 'fastify'
import { exchangeStatus } from '../services/http/exchange.js'
import type { Lease } from '../services/leases/lease-manager.js'
import { queueLabel } from '../services/leases/lease-store.js'
import { MODEL_NAME_MAX, modelKey } from '../services/fleet/model-name.js'

export interface GatewayMetrics {
  /** This gateway's own instruments (not prom-client's global registry: two gateways in one process do not collide). */
  registry: Registry
  requests: Counter<'route' | 'model' | 'status'>
  requestDuration: Histogram<'route' | 'model' | 'status'>
  leaseWait: Histogram<'kind' | 'model'>
  leaseGrants: Counter<'kind' | 'purpose'>
  leaseReleases: Counter<'kind'>
  leaseExpiries: Counter<'kind'>
  queueDepth: Gauge<'kind' | 'model'>
  gpusLeased: Gauge
  gpus: Gauge
  leaseStoreUp: Gauge
  upstreamErrors: Counter<'assignment' | 'reason'>
  /** Scheduler v3 (CONTRACT 16): affinity look-ups, prefill saved, model loads, decision time. */
  affinity: Counter<'result'>
  prefillTokensSaved: Counter
  /** A load of `model` on `assignment` (its name); the model label bounded like every model label. */
  modelLoad: (assignment: string, model: string) => void
  scheduleDecision: Histogram
  /** The exposition text: this gateway's metrics, then the process's. */
  render: () => Promise<string>
  contentType: string
}

declare module 'fastify' {
  interface FastifyInstance {
    metrics: GatewayMetrics
  }
}

/** Model names come from clients (a `*` assignment takes any): past this many, new ones count as `other`. */
const MODEL_LABEL_LIMIT = 200
const UNMATCHED_ROUTE = '(unmatched)'

/** Process metrics (CPU, memory, event loop, GC) are one per process, whatever the number of gateways in it. */
let processRegistry: Registry | undefined
function processMetrics (): Registry {
  if (processRegistry == null) {
    processRegistry = new Registry()
    collectDefaultMetrics({ register: processRegistry, prefix: 'maestro_' })
  }
  return processRegistry
}

/**
 * `make(...labels)`, called once per label set: prom-client hashes the label object on every
 * inc/observe otherwise, on every request. For labels of bounded values only.
 */
function childOf<T> (make: (...labels: string[]) => T): (...labels: string[]) => T {
  const children = new Map<string, T>()
  return (...labels) => {
    const key = labels.join('\u0000')
    let child = children.get(key)
    if (child === undefined) {
      child = make(...labels)
      children.set(key, child)
    }
    return child
  }
}

export default fp(async function metrics (fastify) {
  const registry = new Registry()
  const registers = [registry]
  const models = new Set<string>()
  const modelLabel = (model: string | undefined): string => {
    if (model == null) return ''
    const key = modelKey(model)
    if (models.has(key)) return key
    if (models.size >= MODEL_LABEL_LIMIT || key.length > MODEL_NAME_MAX) return 'other'
    models.add(key)
    return key
  }

  // One status read of the lease store per scrape, shared by the gauges that need it.
  let storeRead: Promise<void> | undefined
  const readStore = async (): Promise<void> => {
    storeRead ??= (async () => {
      queueDepth.reset()
      try {
        const gpuIds = fastify.inventory.current.snapshot.gpus.map((g) => g.id)
        const status = await fastify.leases.store.status(gpuIds)
        for (const [queue, depth] of Object.entries(status.queues)) {
          const label = queueLabel(queue)
          const colon = label.indexOf(':')
          queueDepth.set({ kind: label.slice(0, colon), model: label.slice(colon + 1) }, depth)
        }
        gpusLeased.set(status.gpus.length)
        // Slots count once per assignment (its GPUs all show the same leases).
        const seen = new Set<string>()
        let used = 0
        for (const g of status.gpus) {
          if (g.assignmentId == null || seen.has(g.assignmentId)) continue
          seen.add(g.assignmentId)
          used += g.slotsUsed
        }
        slotsInUse.set(used)
        slotCapacity.set(fastify.inventory.current.snapshot.assignments.reduce((n, a) => n + (a.capacity ?? 1), 0))
        gpus.set(gpuIds.length)
        leaseStoreUp.set(1)
      } catch (err) {
        fastify.log.warn({ err }, 'metrics: lease store status failed')
        gpusLeased.reset()
        leaseStoreUp.set(0)
      }
    })().finally(() => { storeRead = undefined })
    await storeRead
  }

  // Per-request increments are summed here and added when a counter is read (scraped): prom-client
  // hashes its label set on every inc, even through a child.
  const pendingIncs = new Map<Counter.Internal, number>()
  const incLater = (child: Counter.Internal): void => { pendingIncs.set(child, (pendingIncs.get(child) ?? 0) + 1) }
  const flushIncs = (): void => {
    for (const [child, n] of pendingIncs) child.inc(n)
    pendingIncs.clear()
  }
  const requests = new Counter({
    name: 'maestro_http_requests_total',
    help: 'Finished requests by route pattern, model and status (499: the client left before an answer)',
    labelNames: ['route', 'model', 'status'] as const,
    registers,
    collect: flushIncs
  })
  const requestDuration = new Histogram({
    name: 'maestro_http_request_duration_seconds',
    help: 'Time from a request\'s arrival to the end of its response, queueing included',
    labelNames: ['route', 'model', 'status'] as const,
    buckets: [0.005, 0.025, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300],
    registers
  })
  const leaseWait = new Histogram({
    name: 'maestro_lease_wait_seconds',
    help: 'Time a granted lease waited in its model\'s queue',
    labelNames: ['kind', 'model'] as const,
    buckets: [0.001, 0.005, 0.025, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300],
    registers
  })
  const leaseGrants = new Counter({
    name: 'maestro_lease_grants_total',
    help: 'Leases granted to this replica (proxy: a request in flight; reservation: POST /gpu/reserve)',
    labelNames: ['kind', 'purpose'] as const,
    registers,
    collect: flushIncs
  })
  const leaseReleases = new Counter({
    name: 'maestro_lease_releases_total',
    help: 'Proxy leases this replica released at the end of their exchange',
    labelNames: ['kind'] as const,
    registers,
    collect: flushIncs
  })
  const leaseExpiries = new Counter({
    name: 'maestro_lease_expiries_total',
    help: 'Leases this replica gave up, stopping their requests: found taken by another holder, or not renewable for half the ttl',
    labelNames: ['kind'] as const,
    registers
  })
  const queueDepth = new Gauge({
    name: 'maestro_queue_depth',
    help: 'Requests waiting for a lease, per model, across all replicas (read from the lease store at scrape time)',
    labelNames: ['kind', 'model'] as const,
    registers,
    collect: readStore
  })
  const gpusLeased = new Gauge({
    name: 'maestro_gpus_leased',
    help: 'GPUs of the inventory under a lease right now, across all replicas',
    registers,
    collect: readStore
  })
  const gpus = new Gauge({ name: 'maestro_gpus', help: 'GPUs in the inventory', registers, collect: readStore })
  const slotsInUse = new Gauge({
    name: 'maestro_slots_in_use',
    help: 'Leases running right now (one per request in flight; a reservation takes every slot), across all replicas',
    registers,
    collect: readStore
  })
  const slotCapacity = new Gauge({
    name: 'maestro_slot_capacity',
    help: 'Parallel slots of every assignment of the inventory together (assignments sharing GPUs never run at once)',
    registers,
    collect: readStore
  })
  const leaseStoreUp = new Gauge({
    name: 'maestro_lease_store_up',
    help: '1 when the lease store answered this scrape\'s status read, else 0',
    registers,
    collect: readStore
  })
  const upstreamErrors = new Counter({
    name: 'maestro_upstream_errors_total',
    help: 'Upstream failures by assignment: unreachable (then the next candidate is tried), timeout (no headers in time), failed, mid-stream',
    labelNames: ['assignment', 'reason'] as const,
    registers
  })

  const affinity = new Counter({
    name: 'maestro_affinity_total',
    help: 'Prompt-prefix affinity look-ups of leased LLM requests: hit (a server of the candidates held a prefix of the prompt) or miss',
    labelNames: ['result'] as const,
    registers
  })
  const prefillTokensSaved = new Counter({
    name: 'maestro_prefill_tokens_saved_total',
    help: 'Prompt tokens (estimated, chars/4) not computed again because the request went to the server holding its prefix',
    registers
  })
  const modelLoads = new Counter({
    name: 'maestro_model_loads_total',
    help: 'Model loads seen on the final lines of answers (load_duration above 100 ms), by assignment and model',
    labelNames: ['assignment', 'model'] as const,
    registers
  })
  const scheduleDecision = new Histogram({
    name: 'maestro_schedule_decision_seconds',
    help: 'Time the scheduler took to choose (affinity read, cost estimate, the status read when a wait is considered), per leased LLM request',
    buckets: [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1],
    registers
  })
  const loadsOf = childOf((assignment, model) => modelLoads.labels(assignment, model))

  // Per request, each metric's child of one label set is looked up once (`childOf`).
  const grantsOf = childOf((kind, purpose) => leaseGrants.labels(kind, purpose))
  const waitOf = childOf((kind, model) => leaseWait.labels(kind, model))
  const releasesOf = childOf((kind) => leaseReleases.labels(kind))
  fastify.leases.observer = {
    granted: (lease: Lease) => {
      incLater(grantsOf(lease.info.kind, lease.info.purpose))
      waitOf(lease.info.kind, modelLabel(lease.info.model)).observe(lease.queuedMs / 1000)
    },
    released: (lease: Lease) => { incLater(releasesOf(lease.info.kind)) },
    lost: (lease: Lease) => { leaseExpiries.inc({ kind: lease.info.kind }) }
  }

  // Bounded: routes × MODEL_LABEL_LIMIT models × statuses.
  const childrenOf = childOf((route, model, status) => ({ requests: requests.labels(route, model, status), duration: requestDuration.labels(route, model, status) }))

  const observe = (request: FastifyRequest, reply: FastifyReply, startedAt: number): void => {
    const exchange = request.exchange as typeof request.exchange | null
    const children = childrenOf(
      request.routeOptions.url ?? UNMATCHED_ROUTE,
      modelLabel(exchange?.model),
      String(exchangeStatus(reply.statusCode, reply.raw.headersSent))
    )
    incLater(children.requests)
    children.duration.observe((performance.now() - startedAt) / 1000)
    for (const failure of exchange?.upstreamFailures ?? []) upstreamErrors.inc(failure)
  }

  // however the exchange ends, also when the client left midway
  fastify.addHook('onRequest', (request, reply, done) => {
    // (reply.elapsedTime stays 0 unless Fastify logs requests or has onResponse hooks)
    const startedAt = performance.now()
    request.exchange.onClose(() => observe(request, reply, startedAt))
    done()
  })

  const shared = processMetrics()
  fastify.decorate('metrics', {
    registry,
    requests,
    requestDuration,
    leaseWait,
    leaseGrants,
    leaseReleases,
    leaseExpiries,
    queueDepth,
    gpusLeased,
    gpus,
    leaseStoreUp,
    upstreamErrors,
    affinity,
    prefillTokensSaved,
    modelLoad: (assignment: string, model: string) => { loadsOf(assignment, modelLabel(model)).inc() },
    scheduleDecision,
    render: async () => await registry.metrics() + await shared.metrics(),
    contentType: registry.contentType
  })
}, { name: 'metrics', dependencies: ['config', 'exchange', 'gpu-lease', 'inventory'], fastify: '5.x' })
