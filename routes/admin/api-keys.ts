import type { FastifyPluginAsync } from 'fastify'
import { ApiKeyError, type ApiKeyInfo, type KeyChange } from '../../services/clients/api-keys.js'
import { GatewayError } from '../../services/http/errors.js'
import type { ApiKeyCreate, ApiKeyPatch, ApiKeyRecord } from '../../services/fleet/inventory-schema.js'
import { ApiKeyCreated, ApiKeys, ApiKeyCreate as CreateSchema, ApiKeyPatch as PatchSchema, ApiKeyRecord as RecordSchema, Deleted, errorAnswers, KeyParams } from './schemas.js'

const adminOnly = { auth: 'admin', errorStyle: 'ollama' } as const
const tags = ['admin: API keys']

/** The key store's view of a key, as the admin API shows it (limits beside the name; never the secret or its hash). */
function record (info: ApiKeyInfo): ApiKeyRecord {
  return {
    name: info.name,
    source: info.source,
    priority: info.priority,
    ...info.limits,
    ...(info.createdAt === undefined ? {} : { createdAt: info.createdAt }),
    ...(info.revokedAt === undefined ? {} : { revokedAt: info.revokedAt })
  }
}

/** The key store's refusals (400, 404, 409) in the admin API's format. */
async function keyStore<T> (work: Promise<T>): Promise<T> {
  try {
    return await work
  } catch (err) {
    if (err instanceof ApiKeyError) throw new GatewayError(err.statusCode, err.message)
    throw err
  }
}

/**
 * `/admin/api-keys`: the key store's create, list, update and revoke (services/clients/api-keys.ts). The
 * secret is in the answer to the create and nowhere else: not in a list, a log line or a metric.
 */
const apiKeyRoutes: FastifyPluginAsync = async (fastify) => {
  const keys = fastify.apiKeys

  // Each key's tokens this UTC day and month beside its budgets (the usage ledger's counters).
  fastify.get('/admin/api-keys', { schema: { tags, response: { 200: ApiKeys } }, config: adminOnly },
    async () => {
      const list = keys.list()
      const used = await fastify.usage.tokensUsed(list.map((k) => k.name), fastify.usageClock())
      return list.map((info, i) => ({ ...record(info), usedToday: used[i].day, usedThisMonth: used[i].month }))
    })

  fastify.post<{ Body: ApiKeyCreate }>('/admin/api-keys', {
    schema: { tags, body: CreateSchema, response: { 201: ApiKeyCreated, ...errorAnswers } },
    config: adminOnly
  }, async (request, reply) => {
    const { key, info } = await keyStore(keys.create(request.body))
    request.log.info({ apiKey: info.name }, 'API key created')
    reply.code(201)
    return { ...record(info), key }
  })

  fastify.patch<{ Params: { name: string }, Body: ApiKeyPatch }>('/admin/api-keys/:name', {
    schema: { tags, params: KeyParams, body: PatchSchema, response: { 200: RecordSchema, ...errorAnswers } },
    config: adminOnly
  }, async (request) => {
    const { priority, ...limits } = request.body
    const change: KeyChange = { priority, limits }
    return record(await keyStore(keys.update(request.params.name, change)))
  })

  fastify.delete<{ Params: { name: string } }>('/admin/api-keys/:name', {
    schema: { tags, params: KeyParams, response: { 204: Deleted, ...errorAnswers }, description: 'Revokes the key: it stops working on every replica within a second.' },
    config: adminOnly
  }, async (request, reply) => {
    await keyStore(keys.revoke(request.params.name))
    request.log.info({ apiKey: request.params.name }, 'API key revoked')
    return reply.code(204).send()
  })
}

export default apiKeyRoutes
