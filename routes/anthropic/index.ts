import type { FastifyPluginAsync } from 'fastify'
import { errorBody } from '../../services/http/errors.js'
import { ModelRequest } from '../ollama/schemas.js'

/**
 * The Messages API ends a broken stream with an `error` event carrying Anthropic's error object
 * (what the Anthropic SDKs raise as an error).
 */
const sseError = (message: string): string => `event: error\ndata: ${JSON.stringify(errorBody('anthropic', 502, message))}\n\n`

/**
 * Anthropic's Messages API, which Ollama serves itself (`/v1/messages`): leased like
 * `/v1/chat/completions`, body forwarded unchanged, SSE events passed on as they come.
 * Gateway-made errors use Anthropic's `{"type":"error","error":{"type","message"}}`.
 */
const anthropicRoutes: FastifyPluginAsync = async (fastify) => {
  const config = { errorStyle: 'anthropic' as const }
  fastify.post('/v1/messages', { schema: { body: ModelRequest }, config }, async (request, reply) => {
    const { model } = request.body as { model: string }
    const forwarded = request.rawBody as string
    // One copy while it waits: the text it forwards.
    request.forgetBody()
    return await fastify.forwardLeased(request, reply, { kind: 'llm', model, path: '/v1/messages', body: forwarded, streamError: sseError })
  })
}

export default anthropicRoutes
