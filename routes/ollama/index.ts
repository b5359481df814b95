import type { FastifyPluginAsync } from 'fastify'
import { GatewayError } from '../../services/errors.js'
import { gatewayVersion } from '../../services/package-root.js'
import { distinctUpstreams, fetchJson, fleetTags } from '../../services/upstream-catalog.js'
import pullRoute from './pull.js'
import refusals from './refusals.js'
import { ModelRequest, ShowRequest } from './schemas.js'
import { isUnloadRequest, unloadEverywhere } from './unload.js'

/** Ollama's streaming format: a failure after the stream started is one more `{"error"}` line. */
const ndjsonError = (message: string): string => JSON.stringify({ error: message }) + '\n'

const LEASED_PATHS = ['/api/chat', '/api/generate', '/api/embeddings', '/api/embed'] as const

const ollamaRoutes: FastifyPluginAsync = async (fastify) => {
  for (const path of LEASED_PATHS) {
    fastify.post(path, { schema: { body: ModelRequest } }, async (request, reply) => {
      const body = request.body as { model: string } & Record<string, unknown>
      if (isUnloadRequest(path, body)) return await unloadEverywhere(fastify, request, reply, path as '/api/generate' | '/api/chat', body.model)
      const { body: forwarded } = fastify.normalizeOllamaBody(request.rawBody as string, body)
      return await fastify.forwardLeased(request, reply, {
        kind: 'llm', model: body.model, path, body: forwarded, streamError: ndjsonError
      })
    })
  }

  await fastify.register(pullRoute)
  await fastify.register(refusals)

  fastify.post('/api/show', { schema: { body: ShowRequest } }, async (request, reply) => {
    const body = request.body as { model?: string, name?: string }
    const model = body.model ?? body.name
    if (model == null || model === '') throw new GatewayError(400, 'model is required')
    const [assignment] = fastify.inventory.current.candidates(model, 'llm')
    if (assignment == null) throw new GatewayError(404, `model '${model}' not found`)
    return fastify.forwardTo(request, reply, assignment, '/api/show', { body: request.rawBody })
  })

  const llmUpstreams = () => distinctUpstreams(fastify.inventory.current.assignmentsOfKind('llm'))

  // Clients probe `/` and `/api/version` before anything else: open even when API_KEYS is set.
  fastify.route({
    method: ['GET', 'HEAD'],
    url: '/',
    config: { auth: 'open' },
    handler: async (_request, reply) => reply.type('text/plain; charset=utf-8').send('Ollama is running')
  })

  fastify.get('/api/version', { config: { auth: 'open' } }, async () => {
    for (const u of llmUpstreams()) {
      const answer = await fetchJson(`${u.url}/api/version`).catch(() => undefined)
      if (typeof answer?.version === 'string') return { version: answer.version }
    }
    return { version: gatewayVersion }
  })

  fastify.get('/api/tags', async () => {
    const models = await fleetTags(fastify.inventory.current.assignmentsOfKind('llm'),
      async (a) => (await fetchJson(`${a.url}/api/tags`)).models ?? [])
    return { models }
  })

  fastify.get('/api/ps', async () => {
    const lists = await Promise.all(llmUpstreams().map(async (u) =>
      (await fetchJson(`${u.url}/api/ps`).catch(() => ({ models: [] }))).models ?? []))
    return { models: lists.flat() }
  })
}

export default ollamaRoutes
