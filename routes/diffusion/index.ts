import type { Readable } from 'node:stream'
import type { FastifyPluginAsync, FastifyReply, FastifyRequest } from 'fastify'
import type { Assignment } from '../../services/fleet/inventory.js'
import { MODEL_NAME_MAX } from '../../services/fleet/model-name.js'
import { checkedUpload } from '../../services/http/multipart-fields.js'
import { GatewayError } from '../../services/http/errors.js'
import { UploadPins } from '../../services/leases/upload-pins.js'
import { distinctUpstreams } from '../../services/fleet/upstream-catalog.js'
import { ModelRequest } from '../ollama/schemas.js'

/** The text fields before the file are small; past this much without the model field, it is not there. */
const LEADING_FIELDS_LIMIT = 64 * 1024

const diffusionRoutes: FastifyPluginAsync = async (fastify) => {
  const config = { errorStyle: 'diffusion' as const }
  const redis = fastify.leaseRedis?.client
  const pins = new UploadPins(redis == null
    ? undefined
    : {
        get: async (key) => await redis.get(key),
        set: async (key, value, ttlMs) => { await redis.set(key, value, 'PX', ttlMs) }
      }, fastify.maestroConfig.redisKeyPrefix)

  fastify.post('/txt2img', { schema: { body: ModelRequest }, config }, async (request, reply) => {
    const { model } = request.body as { model: string }
    const forwarded = request.rawBody as string
    request.forgetBody()
    // Diffusion bodies go upstream exactly as they came.
    return await fastify.forwardLeased(request, reply, {
      kind: 'diffusor', model, path: '/txt2img', body: forwarded
    })
  })

  fastify.post('/img2img', { schema: { body: ModelRequest }, config }, async (request, reply) => {
    const { model, file_id: fileId } = request.body as { model: string, file_id?: unknown }
    const forwarded = request.rawBody as string
    request.forgetBody()
    const all = fastify.inventory.current.candidates(model, 'diffusor')
    // The uploaded file lives on one server only: go there when it serves the model.
    const server = typeof fileId === 'string' ? await pins.find(fileId).catch(() => undefined) : undefined
    const pinned = all.filter((a) => a.url === server)
    return await fastify.forwardLeased(request, reply, {
      kind: 'diffusor',
      model,
      path: '/img2img',
      body: forwarded,
      candidates: pinned.length > 0 ? pinned : all
    })
  })

  // Multipart uploads stream through unchanged, unbuffered; only their `model` field is looked at
  // on the way (services/http/multipart-fields.ts: once at most, the model of `?model=` when both are
  // given). An upload naming a model goes to a server of that model; one naming none to any
  // server, in turn: for a key with a `models` list, a server of one of its models. The server
  // each file went to is remembered.
  let turn = 0
  fastify.register(async (upload) => {
    upload.removeAllContentTypeParsers()
    upload.addContentTypeParser('*', (_request, payload, done) => { done(null, payload) })
    upload.post('/upload', { config: { ...config, streamedBody: true } }, async (request, reply) => {
      try {
        const assignment = await uploadTarget(request)
        return forwardUpload(request, reply, assignment)
      } catch (err) {
        // The rest of the upload is not read: do not keep the connection for another request.
        if (!reply.sent) reply.header('connection', 'close')
        throw err
      }
    })
  })

  /** The server an upload goes to, once its fields before the file have been checked. */
  const uploadTarget = async (request: FastifyRequest): Promise<Assignment> => {
    const { model, body } = await checkedUpload(request.headers['content-type'], (request.query as { model?: unknown }).model, request.body as Readable, {
      leadingLimit: LEADING_FIELDS_LIMIT, modelMax: MODEL_NAME_MAX
    })
    request.body = body
    const inventory = fastify.inventory.current
    if (model != null) {
      const servers = distinctUpstreams(inventory.candidates(model, 'diffusor'))
      if (servers.length === 0) throw new GatewayError(404, `model '${model}' not found`)
      fastify.clientLimits.checkModel(request.client, model)
      return servers[turn++ % servers.length]
    }
    const all = distinctUpstreams(inventory.assignmentsOfKind('diffusor'))
    if (all.length === 0) throw new GatewayError(404, 'no diffusion server in the inventory')
    const servers = all.filter((a) => fastify.clientLimits.mayUse(request.client, a))
    if (servers.length === 0) throw new GatewayError(403, 'this API key may use no model of the diffusion servers')
    return servers[turn++ % servers.length]
  }

  const forwardUpload = (request: FastifyRequest, reply: FastifyReply, assignment: Assignment): FastifyReply =>
    fastify.forwardTo(request, reply, assignment, '/upload', {
      onJsonAnswer: async (answer, statusCode) => {
        const fileId = (answer as { file_id?: unknown } | null)?.file_id
        if (statusCode === 200 && typeof fileId === 'string') await pins.pin(fileId, assignment.url)
      }
    })
}

export default diffusionRoutes
