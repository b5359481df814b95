import type { Readable } from 'node:stream'
import type { FastifyPluginAsync } from 'fastify'
import { GatewayError } from '../../services/http/errors.js'
import { checkedUpload } from '../../services/http/multipart-fields.js'
import { MODEL_NAME_MAX } from '../../services/fleet/model-name.js'
import { ModelRequest } from '../ollama/schemas.js'

/** The text fields before the file are small; past this much without the model field, it is not there. */
const LEADING_FIELDS_LIMIT = 64 * 1024

const UPLOAD_PATHS = ['/v1/audio/transcriptions', '/v1/audio/translations'] as const

/**
 * OpenAI's audio routes, leased on the assignments of `speech_models` and forwarded unchanged to an
 * OpenAI-compatible speech server. Gateway-made errors use OpenAI's envelope.
 *
 * An upload is streamed through as it arrives, never held: the model is read from `?model=` or
 * from the multipart fields sent before the file (what openai-python, httpx, requests and curl -F
 * with the model first send; openai-node sends the fields in the order given), and what was read
 * to find it is sent on first. BODY_LIMIT bounds the upload like any body. What is checked is what
 * is sent: a `model` field may appear once, and must name the model of `?model=` when both are
 * given (services/http/multipart-fields.ts).
 */
const audioRoutes: FastifyPluginAsync = async (fastify) => {
  const config = { errorStyle: 'openai' as const }

  fastify.post('/v1/audio/speech', { schema: { body: ModelRequest }, config }, async (request, reply) => {
    const { model } = request.body as { model: string }
    const forwarded = request.rawBody as string
    request.forgetBody()
    return await fastify.forwardLeased(request, reply, { kind: 'speech', model, path: '/v1/audio/speech', body: forwarded })
  })

  // Streamed through unread: an upload holds none of the gateway's body memory (BODY_MEMORY_LIMIT).
  const uploadConfig = { ...config, streamedBody: true }
  await fastify.register(async (uploads) => {
    uploads.removeAllContentTypeParsers()
    uploads.addContentTypeParser('*', (_request, payload, done) => { done(null, payload) })
    for (const path of UPLOAD_PATHS) {
      uploads.post(path, { config: uploadConfig }, async (request, reply) => {
        try {
          // The fields before the file are checked before any lease is taken; the rest on its way.
          // MODEL_NAME_MAX: the limit the JSON routes' schemas set (CONTRACT section 8).
          const { model, body } = await checkedUpload(request.headers['content-type'], (request.query as { model?: unknown }).model, request.body as Readable, {
            leadingLimit: LEADING_FIELDS_LIMIT, modelMax: MODEL_NAME_MAX
          })
          // reply-from streams a request body that is a stream: the upload from its first byte
          request.body = body
          if (model == null) throw new GatewayError(400, 'model is required: send the model field before the file, or ?model=<name>')
          return await fastify.forwardLeased(request, reply, { kind: 'speech', model, path })
        } catch (err) {
          // The rest of the upload is not read: do not keep the connection for another request.
          if (!reply.sent) reply.header('connection', 'close')
          throw err
        }
      })
    }
  })
}

export default audioRoutes
