import type { FastifyPluginAsync } from 'fastify'
import * as rules from '../../services/fleet/fleet-rules.js'
import type { ModelAlias } from '../../services/fleet/model-aliases.js'
import { AliasCreate, AliasRecord, Aliases, Deleted, errorAnswers, FallbacksBody, FallbacksRecord, FallbacksList, NameParams } from './schemas.js'

/** Every admin route needs the admin token when ADMIN_TOKEN is set (plugins/auth.ts). */
const adminOnly = { auth: 'admin', errorStyle: 'ollama' } as const

type NameRequest = { Params: { '*': string } }

/**
 * Model aliases and fallbacks (CONTRACT 17): each change one transaction (or one atomic file
 * write), used by every replica within a second, as the other fleet changes (routes/admin/fleet.ts).
 * Names may hold slashes (`namespace/model:tag`), so the name is the rest of the path.
 */
const aliasRoutes: FastifyPluginAsync = async (fastify) => {
  const store = fastify.fleetStore

  const change = async <T>(work: (fleet: rules.Fleet) => T): Promise<T> => {
    const result = await store.change(work)
    try {
      await fastify.inventoryChanged()
    } catch (err) {
      // Stored; replicas that were not told see it at their next refresh (INVENTORY_REFRESH_MS).
      fastify.log.warn({ err }, 'inventory changed, but not every replica could be told at once')
    }
    return result
  }

  const aliases = { tags: ['admin: aliases'] }
  fastify.get('/admin/aliases', { schema: { ...aliases, response: { 200: Aliases } }, config: adminOnly },
    async () => rules.getAliases(await store.read()))
  fastify.post<{ Body: ModelAlias }>('/admin/aliases', {
    schema: {
      ...aliases,
      body: AliasCreate,
      response: { 201: AliasRecord, ...errorAnswers },
      description: 'A new name for a model: requests naming it are leased and forwarded as the model, and answered with the alias. ' +
        '400 when `model` is no model (or an alias); 409 when the alias is a model\'s name or an alias already.'
    },
    config: adminOnly
  }, async (request, reply) => {
    const record = await change((f) => rules.createAlias(f, request.body))
    return reply.code(201).send(record)
  })
  fastify.delete<NameRequest>('/admin/aliases/*', { schema: { ...aliases, params: NameParams, response: { 204: Deleted, ...errorAnswers } }, config: adminOnly },
    async (request, reply) => {
      await change((f) => { rules.deleteAlias(f, request.params['*']) })
      return reply.code(204).send()
    })

  const fallbacks = { tags: ['admin: fallbacks'] }
  fastify.get('/admin/fallbacks', { schema: { ...fallbacks, response: { 200: FallbacksList } }, config: adminOnly },
    async () => (await store.read()).fallbacks ?? [])
  fastify.get<NameRequest>('/admin/fallbacks/*', { schema: { ...fallbacks, params: NameParams, response: { 200: FallbacksRecord, ...errorAnswers } }, config: adminOnly },
    async (request) => rules.getFallbacks(await store.read(), request.params['*']))
  fastify.put<NameRequest & { Body: { fallbacks: string[] } }>('/admin/fallbacks/*', {
    schema: {
      ...fallbacks,
      params: NameParams,
      body: FallbacksBody,
      response: { 200: FallbacksRecord, ...errorAnswers },
      description: "Replaces the model's fallbacks (an empty list removes them): models that serve its requests, first that can serve sooner, " +
        'when none of its servers is reachable and undrained, or its expected wait passes FALLBACK_AFTER_MS.'
    },
    config: adminOnly
  }, async (request) => await change((f) => rules.setFallbacks(f, request.params['*'], request.body.fallbacks)))
}

export default aliasRoutes
