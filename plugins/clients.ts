import { isIP } from 'node:net'
import fp from 'fastify-plugin'
import { Counter, Histogram, type Registry } from 'prom-client'
import type { FastifyRequest } from 'fastify'
import type { ApiKey } from '../services/clients/api-keys.js'
import { ClientLimiter, MemoryClientLimitStore, RedisClientLimitStore, type Client, type LimitName } from '../services/clients/client-limits.js'
import { exchangeStatus } from '../services/http/exchange.js'

/** What a leased route does with its client's admission. */
export interface ClientPass {
  /** The request's lease was granted after waiting `queuedMs`. */
  granted: (queuedMs: number) => void
}

declare module 'fastify' {
  interface FastifyRequest {
    /** Who sent the request: its API key (each key its own client), else its address. */
    client: Client
  }
  interface FastifyInstance {
    clientLimits: ClientLimiter
    /**
     * Check the request's client may use `model` now (403 / 429 otherwise, as a GatewayError); its
     * hold on the client's limits ends with the exchange, however it ends. Once per request.
     */
    admitClient: (request: FastifyRequest, model: string, aliasTarget?: string) => Promise<ClientPass>
  }
}

/** Past this many distinct clients (addresses when no keys are set), new ones are counted as `other`. */
const CLIENT_LABEL_LIMIT = 200

/** `::ffff:10.0.0.1` is 10.0.0.1: one client, one name. */
function plainAddress (address: string | undefined): string {
  if (address == null || address === '') return 'unknown'
  return address.startsWith('::ffff:') && isIP(address.slice(7)) === 4 ? address.slice(7) : address
}

/** The client's address: X-Forwarded-For's first hop when the proxy in front is trusted to set it, else the socket's. */
export function clientAddress (request: Pick<FastifyRequest, 'headers' | 'raw'>, trustProxy: boolean): string {
  if (trustProxy) {
    const header = request.headers['x-forwarded-for']
    const first = (Array.isArray(header) ? header[0] : header)?.split(',')[0]?.trim()
    if (first != null && isIP(first) !== 0) return plainAddress(first)
  }
  return plainAddress(request.raw.socket?.remoteAddress)
}

/** Per-client instruments, labelled by key name (never a secret), at most CLIENT_LABEL_LIMIT names. */
function clientMetrics (registry: Registry) {
  const registers = [registry]
  const names = new Set<string>()
  return {
    label: (client: Client): string => {
      if (names.has(client.name)) return client.name
      if (names.size >= CLIENT_LABEL_LIMIT) return 'other'
      names.add(client.name)
      return client.name
    },
    requests: new Counter({
      name: 'maestro_client_requests_total',
      help: 'Model requests by client (API key name, or address when no keys are set) and status, refused ones included',
      labelNames: ['client', 'status'] as const,
      registers
    }),
    queueWait: new Histogram({
      name: 'maestro_client_queue_wait_seconds',
      help: 'Time a client\'s granted requests waited for their lease',
      labelNames: ['client'] as const,
      buckets: [0.001, 0.005, 0.025, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300],
      registers
    }),
    refused: new Counter({
      name: 'maestro_client_limited_total',
      help: 'Requests refused by a client limit: 429 for maxConcurrent, maxQueued, rpm, tokensPerDay, tokensPerMonth; 403 for models',
      labelNames: ['client', 'limit'] as const,
      registers
    })
  }
}

/** Address clients kept made (see addressClient). */
const ADDRESS_CLIENTS_KEPT = 1024

const ADMIN_CLIENT: Client = { id: 'admin', name: 'admin', priority: 'normal', limits: {} }

export default fp(async function clients (fastify) {
  const config = fastify.maestroConfig
  const ofKey = new WeakMap<ApiKey, Client>()
  const keyClient = (key: ApiKey): Client => {
    let client = ofKey.get(key)
    if (client == null) {
      client = { id: `key:${key.name}`, name: key.name, priority: key.priority, limits: key.limits, modelKeys: key.modelKeys }
      ofKey.set(key, client)
    }
    return client
  }

  const metrics = clientMetrics(fastify.metrics.registry)

  const limiter = new ClientLimiter(
    fastify.leaseRedis != null
      ? new RedisClientLimitStore(fastify.leaseRedis.client, config.redisKeyPrefix)
      : new MemoryClientLimitStore(),
    {
      ttlMs: config.leaseTtlMs,
      log: fastify.log,
      onRefused: (client: Client, limit: LimitName) => { metrics.refused.inc({ client: metrics.label(client), limit }) },
      // token budgets: the usage ledger's per-key counters (shared by the replicas), on the usage clock
      tokensUsed: async (keyName: string, at: number) => (await fastify.usage.tokensUsed([keyName], at))[0],
      now: fastify.usageClock
    }
  )
  limiter.start()
  fastify.addHook('onClose', async () => { limiter.close() })
  fastify.decorate('clientLimits', limiter)

  // One client per address, kept (a few addresses make most requests; the lease store and the
  // meters look clients up by id, cheaper with the same string each time); many: started over.
  const byAddress = new Map<string, Client>()
  const addressClient = (request: FastifyRequest): Client => {
    const address = clientAddress(request, config.trustProxy)
    let client = byAddress.get(address)
    if (client === undefined) {
      if (byAddress.size >= ADDRESS_CLIENTS_KEPT) byAddress.clear()
      client = { id: `addr:${address}`, name: address, priority: 'normal', limits: {} }
      byAddress.set(address, client)
    }
    return client
  }
  /** Requests that asked for a model: counted per client when they end. */
  const admitted = new WeakSet<FastifyRequest>()

  fastify.decorateRequest('client', null as unknown as Client)
  fastify.addHook('onRequest', (request, reply, done) => {
    const credential = request.credential
    request.client = credential === 'admin' ? ADMIN_CLIENT : credential != null ? keyClient(credential) : addressClient(request)
    request.exchange.onClose(() => {
      if (!admitted.has(request)) return
      metrics.requests.inc({ client: metrics.label(request.client), status: String(exchangeStatus(reply.statusCode, reply.raw.headersSent)) })
    })
    done()
  })

  fastify.decorate('admitClient', async function (request: FastifyRequest, model: string, aliasTarget?: string): Promise<ClientPass> {
    const client = request.client
    admitted.add(request)
    const ticket = await limiter.admit(client, model, aliasTarget)
    request.exchange.onClose(ticket.release)
    return {
      granted: (queuedMs: number) => {
        ticket.granted()
        metrics.queueWait.observe({ client: metrics.label(client) }, queuedMs / 1000)
      }
    }
  })
}, { name: 'clients', dependencies: ['config', 'redis', 'exchange', 'metrics', 'auth', 'upstream-proxy', 'usage'], fastify: '5.x' })
