import type { Readable } from 'node:stream'
import type { FastifyPluginAsync } from 'fastify'
import { GatewayError } from '../../services/errors.js'
import { multipartBoundary, readLeadingField } from '../../services/multipart-fields.js'
import { MODEL_NAME_MAX } from '../../services/model-name.js'
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
 * to find it is sent on first. BODY_LIMIT bounds the upload like any body.
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
          const boundary = multipartBoundary(request.headers['content-type'])
          if (boundary == null) throw new GatewayError(400, 'request body must be multipart/form-data with a boundary')
          const query = request.query as { model?: unknown }
          let model = typeof query.model === 'string' ? query.model : undefined
          if (model == null || model === '') {
            const leading = await readLeadingField(request.body as Readable, boundary, 'model', LEADING_FIELDS_LIMIT)
            model = leading.value?.trim()
            // reply-from streams a request body that is a stream: the upload from its first byte
            request.body = leading.body
          }
          if (model == null || model === '') throw new GatewayError(400, 'model is required: send the model field before the file, or ?model=<name>')
          // The limit the JSON routes' schemas set (CONTRACT section 8): names become queue names, log fields, metric labels.
          if (model.length > MODEL_NAME_MAX) throw new GatewayError(400, `model is longer than ${MODEL_NAME_MAX} characters`)
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
