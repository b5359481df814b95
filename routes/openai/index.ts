import type { FastifyPluginAsync } from 'fastify'
import type { Static } from '@sinclair/typebox'
import { errorBody, GatewayError } from '../../services/http/errors.js'
import { modelKey } from '../../services/fleet/model-name.js'
import { withAliases } from '../../services/fleet/model-aliases.js'
import type { OllamaModelEntry } from '../../services/fleet/upstream-catalog.js'
import { ImageGenerationRequest, Model, ModelList, ModelRequest } from './schemas.js'

/** OpenAI's streaming format: a failure after the stream started is one more SSE event carrying an error. */
const sseError = (message: string): string => `data: ${JSON.stringify(errorBody('openai', 502, message))}\n\n`

/**
 * The Responses API's way to end a broken stream: an `error` event (OpenAI's `ResponseErrorEvent`,
 * no sequence number: the gateway does not count the upstream's events).
 */
const responsesError = (message: string): string =>
  `event: error\ndata: ${JSON.stringify({ type: 'error', code: 'api_error', message, param: null })}\n\n`

/** Ollama serves these itself; the gateway leases and forwards them, body untouched. */
const LEASED_PATHS: Record<string, (message: string) => string> = {
  '/v1/chat/completions': sseError,
  '/v1/completions': sseError,
  '/v1/embeddings': sseError,
  '/v1/responses': responsesError
}

/** Ollama's owner of a model: the namespace in `[host/][namespace/]model[:tag]`, `library` when none. */
function ownerOf (name: string): string {
  const parts = name.split('/')
  return parts.length >= 2 ? parts[parts.length - 2] : 'library'
}

function toModel (entry: OllamaModelEntry, id = entry.name): Static<typeof Model> {
  const modified = Date.parse(entry.modified_at ?? '')
  return { id, object: 'model', created: Number.isFinite(modified) ? Math.floor(modified / 1000) : 0, owned_by: ownerOf(entry.name) }
}

/**
 * `"512x768"` → `{ width: 512, height: 768 }`; `auto` (or none) leaves the server's default.
 * stablediffusion-fastapi-multigpu ignores keys it does not know, `width` and `height` among them:
 * its pipeline makes its own size whatever `size` says. They are sent for servers that read them.
 */
export function dimensions (size: string | undefined): { width?: number, height?: number } {
  const m = /^(\d+)x(\d+)$/.exec(size ?? '')
  return m == null ? {} : { width: Number(m[1]), height: Number(m[2]) }
}

type UpstreamAnswer = { images: string[] } | { failed: { status: number, contentType: string | null, body: Buffer } }

/**
 * OpenAI-compatible API: chat, completions and embeddings leased and forwarded to Ollama's own
 * `/v1` routes; the model list from the fleet; image generation on the Stable Diffusion servers.
 * Gateway-made errors here use OpenAI's envelope.
 */
const openaiRoutes: FastifyPluginAsync = async (fastify) => {
  const config = { errorStyle: 'openai' as const }

  for (const [path, streamError] of Object.entries(LEASED_PATHS)) {
    fastify.post(path, { schema: { body: ModelRequest }, config }, async (request, reply) => {
      const { model } = request.body as { model: string }
      const forwarded = request.rawBody as string
      // One copy while it waits: the text it forwards.
      request.forgetBody()
      // Unlike Ollama's native API, nothing is normalised: `stream` already defaults to false here.
      return await fastify.forwardLeased(request, reply, {
        kind: 'llm', model, path, body: forwarded, streamError
      })
    })
  }

  /** The same models as `/api/tags`, from the background poll, aliases among them. */
  const fleetModels = (): OllamaModelEntry[] => withAliases(fastify.upstreams.tags(), fastify.inventory.current.aliases())

  fastify.get('/v1/models', { schema: { response: { 200: ModelList } }, config }, async () => {
    return { object: 'list' as const, data: fleetModels().map((entry) => toModel(entry)) }
  })

  // A wildcard, not `:model`: names may hold slashes (`namespace/model:tag`), sent encoded or not.
  fastify.get('/v1/models/*', { schema: { response: { 200: Model } }, config }, async (request) => {
    const name = (request.params as { '*': string })['*']
    const entry = fleetModels().find((e) => modelKey(e.name) === modelKey(name))
    if (entry == null) throw new GatewayError(404, `model '${name}' not found`)
    // Echo the name as asked, as Ollama does.
    return toModel(entry, name)
  })

  fastify.post('/v1/images/generations', { schema: { body: ImageGenerationRequest }, config }, async (request, reply) => {
    const { n = 1, size, response_format: format, ...rest } = request.body as Static<typeof ImageGenerationRequest>
    // One copy while it waits: the parsed fields it sends on.
    request.forgetBody()
    if (format === 'url') {
      throw new GatewayError(400, "response_format 'url' is not supported: the gateway stores no images; use 'b64_json'")
    }
    // The server ignores keys it does not know; the client's own extras (num_inference_steps) go along.
    const txt2img = { ...rest, ...dimensions(size) }
    // One lease for all n images: the GPU is not handed to anyone else between them.
    const answer = await fastify.withLease<UpstreamAnswer>(request, reply, { kind: 'diffusor', model: rest.model }, async (upstream) => {
      const images: string[] = []
      for (let i = 0; i < n; i++) {
        const res = await upstream.post('/txt2img', { ...txt2img, model: upstream.model })
        const body = Buffer.from(await res.arrayBuffer())
        if (!res.ok) return { failed: { status: res.status, contentType: res.headers.get('content-type'), body } }
        images.push(body.toString('base64'))
      }
      return { images }
    })
    if ('failed' in answer) {
      // The upstream's own error passes through unchanged.
      const { status, contentType, body } = answer.failed
      if (contentType != null) reply.type(contentType)
      return reply.code(status).send(body)
    }
    request.usage?.add({ images: answer.images.length })
    return { created: Math.floor(Date.now() / 1000), data: answer.images.map((b64) => ({ b64_json: b64 })) }
  })

  // Unknown /v1 paths answer in OpenAI's envelope too.
  await fastify.register(async (v1) => {
    v1.setNotFoundHandler(async (request, reply) => {
      return await reply.code(404).type('application/json; charset=utf-8')
        .send(errorBody('openai', 404, `no route ${request.method} ${request.url.split('?')[0]}`))
    })
  }, { prefix: '/v1' })
}

export default openaiRoutes
