import type { FastifyPluginAsync } from 'fastify'

/**
 * Model management that cannot be done right for a whole fleet through one gateway: each server
 * keeps its own model store. Refused with 501 and a JSON `{"error"}` that Ollama's clients show
 * as the message. Answered before the body is read (a blob upload can be gigabytes).
 */
const REFUSED: Array<{ method: 'DELETE' | 'POST' | 'HEAD', url: string, what: string }> = [
  { method: 'DELETE', url: '/api/delete', what: 'deleting a model' },
  { method: 'POST', url: '/api/copy', what: 'copying a model' },
  { method: 'POST', url: '/api/create', what: 'creating a model' },
  { method: 'POST', url: '/api/push', what: 'pushing a model' },
  { method: 'HEAD', url: '/api/blobs/:digest', what: 'checking a blob' },
  { method: 'POST', url: '/api/blobs/:digest', what: 'uploading a blob' }
]

export const refusalMessage = (what: string): string =>
  `${what} is not available through the gateway: the fleet's models are managed per server ` +
  '(ask the operator; POST /api/pull pulls a model onto every server assigned it)'

const refusals: FastifyPluginAsync = async (fastify) => {
  for (const { method, url, what } of REFUSED) {
    fastify.route({
      method,
      url,
      onRequest: async (request, reply) => {
        if (request.headers['transfer-encoding'] != null || Number(request.headers['content-length']) > 0) reply.header('connection', 'close')
        return reply.sendError(501, refusalMessage(what))
      },
      handler: async (_request, reply) => reply
    })
  }
}

export default refusals
