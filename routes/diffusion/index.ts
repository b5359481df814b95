import type { FastifyPluginAsync } from 'fastify'
import { GatewayError } from '../../services/errors.js'
import { UploadPins } from '../../services/upload-pins.js'
import { distinctUpstreams } from '../../services/upstream-catalog.js'
import { ModelRequest } from '../ollama/schemas.js'

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

  // Multipart uploads stream through untouched: no parsing, no buffering. Successive uploads go
  // to the diffusion servers in turn, and the server each file went to is remembered.
  let turn = 0
  fastify.register(async (upload) => {
    upload.removeAllContentTypeParsers()
    upload.addContentTypeParser('*', (_request, payload, done) => { done(null, payload) })
    upload.post('/upload', { config: { ...config, streamedBody: true } }, async (request, reply) => {
      const servers = distinctUpstreams(fastify.inventory.current.assignmentsOfKind('diffusor'))
      if (servers.length === 0) throw new GatewayError(404, 'no diffusion server in the inventory')
      const assignment = servers[turn++ % servers.length]
      return fastify.forwardTo(request, reply, assignment, '/upload', {
        onJsonAnswer: async (answer, statusCode) => {
          const fileId = (answer as { file_id?: unknown } | null)?.file_id
          if (statusCode === 200 && typeof fileId === 'string') await pins.pin(fileId, assignment.url)
        }
      })
    })
  })
}

export default diffusionRoutes
