import fp from 'fastify-plugin'
import { TypeCompiler } from '@sinclair/typebox/compiler'
import type { TSchema } from '@sinclair/typebox'

declare module 'fastify' {
  interface FastifyRequest {
    /** The request body exactly as received, for forwarding byte for byte. */
    rawBody?: string
  }
}

/**
 * JSON bodies for every route of the gateway: parsed whatever the Content-Type says (curl -d sends
 * form encoding, and Ollama does not care), the raw text kept for forwarding, and schemas that
 * check without ever coercing, stripping or defaulting a body that is forwarded.
 */
export default fp(async function requestBody (fastify) {
  const bodyLimit = fastify.maestroConfig.bodyLimit
  fastify.decorateRequest('rawBody', undefined)
  fastify.removeAllContentTypeParsers()
  fastify.addContentTypeParser('*', { parseAs: 'string', bodyLimit }, function (request, body, done) {
    const raw = body as string
    request.rawBody = raw
    if (raw.trim() === '') {
      done(null, undefined)
      return
    }
    try {
      done(null, JSON.parse(raw))
    } catch (err) {
      const e = new Error(`invalid JSON body: ${(err as Error).message}`) as Error & { statusCode: number }
      e.statusCode = 400
      done(e, undefined)
    }
  })

  fastify.setValidatorCompiler(({ schema }) => {
    const check = TypeCompiler.Compile(schema as TSchema)
    return (data: unknown) => {
      if (check.Check(data)) return { value: data }
      const first = check.Errors(data).First()
      const error = new Error(first == null ? 'invalid request' : describe(first.path, first.message))
      return { error }
    }
  })
}, { name: 'request-body', dependencies: ['config'], fastify: '5.x' })

function describe (path: string, message: string): string {
  if (path === '' || path === '/') return 'request body must be a JSON object'
  if (path === '/model') return 'model is required'
  return `${path.slice(1).replace(/\//g, '.')}: ${message}`
}
