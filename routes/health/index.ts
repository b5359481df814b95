import type { FastifyPluginAsync } from 'fastify'

type Check = 'ok' | 'down' | 'unused'

const HEALTH_TIMEOUT_MS = 2000

async function within<T> (promise: Promise<T>, ms: number): Promise<T> {
  let timer: NodeJS.Timeout | undefined
  const timeout = new Promise<never>((_resolve, reject) => { timer = setTimeout(() => reject(new Error('timeout')), ms) })
  try {
    return await Promise.race([promise, timeout])
  } finally {
    clearTimeout(timer)
  }
}

const healthRoutes: FastifyPluginAsync = async (fastify) => {

  // Probes come every few seconds: their lines in the log show at debug level only.
  fastify.get('/health', { config: { auth: 'open', accessLogLevel: 'debug' } }, async (_request, reply) => {
    const db = fastify.inventoryDb
    const redis = fastify.leaseRedis
    const [mariadb, redisState]: Check[] = await Promise.all([
      db == null ? 'unused' : within(db.ping(), HEALTH_TIMEOUT_MS).then(() => 'ok' as const, () => 'down' as const),
      redis == null ? 'unused' : within(redis.client.ping(), HEALTH_TIMEOUT_MS).then(() => 'ok' as const, () => 'down' as const)
    ])
    const inventory = fastify.inventory.health()
    const down = mariadb === 'down' || redisState === 'down'
    return reply.code(down ? 503 : 200).send({
      status: down ? 'degraded' : 'ok',
      mariadb,
      redis: redisState,
      // An open route: a word, never the loader's text (file contents, driver messages), which is in the log.
      inventory: { source: inventory.source, ok: inventory.ok, loadedAt: inventory.loadedAt, error: inventory.ok ? undefined : 'last refresh failed' },
      leases: { held: fastify.leases.leases().length, waiting: fastify.leases.waiting(), store: fastify.leases.store.kind }
    })
  })

  fastify.get('/health/live', { config: { auth: 'open', accessLogLevel: 'debug' } }, async () => ({ status: 'ok' }))

  fastify.get('/health/ready', { config: { auth: 'open', accessLogLevel: 'debug' } }, async (_request, reply) => {
    if (fastify.leases.draining) return reply.code(503).send({ status: 'draining' })
    if (!fastify.leases.store.available()) return reply.code(503).send({ status: 'lease store unavailable' })
    return { status: 'ready' }
  })
}

export default healthRoutes
