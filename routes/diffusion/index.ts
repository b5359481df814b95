import type { FastifyPluginAsync } from 'fastify'
import { GatewayError } from '../../services/errors.js'
import { ModelRequest } from '../ollama/schemas.js'

const diffusionRoutes: FastifyPluginAsync = async (fastify) => {
  const config = { errorStyle: 'diffusion' as const }

  for (const path of ['/txt2img', '/img2img'] as const) {
    fastify.post(path, { schema: { body: ModelRequest }, config }, async (request, reply) => {
      const body = request.body as { model: string }
      // Diffusion bodies go upstream exactly as they came.
      return await fastify.forwardLeased(request, reply, {
        kind: 'diffusor', model: body.model, path, body: request.rawBody as string
      })
    })
  }

  // Multipart uploads stream through untouched: no parsing, no buffering.
  fastify.register(async (upload) => {
    upload.removeAllContentTypeParsers()
    upload.addContentTypeParser('*', (_request, payload, done) => { done(null, payload) })
    upload.post('/upload', { config }, async (request, reply) => {
      const [assignment] = fastify.inventory.current.assignmentsOfKind('diffusor')
      if (assignment == null) throw new GatewayError(404, 'no diffusion server in the inventory')
      return fastify.forwardTo(request, reply, assignment, '/upload')
    })
  })
}

export default diffusionRoutes
