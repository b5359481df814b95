import type { FastifyPluginAsync, FastifyRequest } from 'fastify'
import { GatewayError } from '../../services/http/errors.js'
import { gatewayVersion } from '../../services/config/package-root.js'
import { withAliases } from '../../services/fleet/model-aliases.js'
import { withModel } from '../../services/http/ollama-normalizer.js'
import pullRoute from './pull.js'
import refusals from './refusals.js'
import { ModelRequest, ShowRequest } from './schemas.js'
import { isUnloadRequest, unloadEverywhere } from './unload.js'

/** Ollama's streaming format: a failure after the stream started is one more `{"error"}` line. */
const ndjsonError = (message: string): string => JSON.stringify({ error: message }) + '\n'

const LEASED_PATHS = ['/api/chat', '/api/generate', '/api/embeddings', '/api/embed'] as const

const ollamaRoutes: FastifyPluginAsync = async (fastify) => {
  /** The text to forward and the model; the request keeps neither its raw nor its parsed body (one copy while it waits). */
  const normalized = (request: FastifyRequest): { model: string, forwarded: string } => {
    const body = request.body as { model: string } & Record<string, unknown>
    const { body: forwarded } = fastify.normalizeOllamaBody(request.rawBody as string, body)
    request.forgetBody()
    return { model: body.model, forwarded }
  }

  for (const path of LEASED_PATHS) {
    fastify.post(path, { schema: { body: ModelRequest } }, async (request, reply) => {
      // No local for the parsed body: one kept in this handler stays alive across the await below
      // (a second copy of a waiting request's body, its prompt, beside the forwarded text).
      const unload = isUnloadRequest(path, request.body as Record<string, unknown>)
      if (unload) return await unloadEverywhere(fastify, request, reply, path as '/api/generate' | '/api/chat', (request.body as { model: string }).model)
      const { model, forwarded } = normalized(request)
      return await fastify.forwardLeased(request, reply, {
        kind: 'llm', model, path, body: forwarded, streamError: ndjsonError
      })
    })
  }

  await fastify.register(pullRoute)
  await fastify.register(refusals)

  fastify.post('/api/show', { schema: { body: ShowRequest } }, async (request, reply) => {
    const body = request.body as { model?: string, name?: string }
    const model = body.model ?? body.name
    if (model == null || model === '') throw new GatewayError(400, 'model is required')
    // An alias shows its target (CONTRACT 17), asked of the server by the target's name.
    const target = fastify.inventory.current.aliasTarget(model)
    const [assignment] = fastify.inventory.current.candidates(target ?? model, 'llm')
    if (assignment == null) throw new GatewayError(404, `model '${model}' not found`)
    // A key reaches only the servers of its own models, as on the proxied routes (403).
    fastify.clientLimits.checkModel(request.client, model, target)
    const forwarded = target === undefined ? request.rawBody : withModel(request.rawBody as string, target, body.model != null ? 'model' : 'name')
    return fastify.forwardTo(request, reply, assignment, '/api/show', { body: forwarded })
  })

  // Clients probe `/` and `/api/version` before anything else: open even when API_KEYS is set.
  fastify.route({
    method: ['GET', 'HEAD'],
    url: '/',
    config: { auth: 'open' },
    handler: async (_request, reply) => reply.type('text/plain; charset=utf-8').send('Ollama is running')
  })

  // The catalogue answers from the background poll (fastify.upstreams): no upstream call per request.
  fastify.get('/api/version', { config: { auth: 'open' } }, async () => ({ version: fastify.upstreams.version() ?? gatewayVersion }))

  // Aliases as entries of their own, with their target's details (CONTRACT 17).
  fastify.get('/api/tags', async () => ({ models: withAliases(fastify.upstreams.tags(), fastify.inventory.current.aliases()) }))

  fastify.get('/api/ps', async () => ({ models: fastify.upstreams.ps() }))
}

export default ollamaRoutes
