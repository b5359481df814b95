import fp from 'fastify-plugin'
import type { FastifyReply } from 'fastify'
import { LeaseError } from '../services/leases/lease-manager.js'
import { errorBody, GatewayError, type ErrorStyle } from '../services/http/errors.js'

declare module 'fastify' {
  interface FastifyContextConfig {
    /** How this route words gateway-made errors; `ollama` when unset. */
    errorStyle?: ErrorStyle
  }
  interface FastifyReply {
    /** Answer a gateway-made error in the route's style. */
    sendError: (statusCode: number, message: string, retryAfterSeconds?: number) => FastifyReply
  }
}

const FASTIFY_MESSAGES: Record<string, (err: any) => string> = {
  FST_ERR_CTP_BODY_TOO_LARGE: () => 'request body is too large',
  FST_ERR_CTP_EMPTY_JSON_BODY: () => 'request body is empty',
  // a Content-Type header that is not a media type at all (bodies are read as JSON whatever it names)
  FST_ERR_CTP_INVALID_MEDIA_TYPE: () => 'Content-Type header is not a valid media type',
  FST_ERR_CTP_INVALID_CONTENT_LENGTH: () => 'request body does not match its Content-Length'
}

export default fp(async function errors (fastify) {
  fastify.decorateReply('sendError', function (this: FastifyReply, statusCode: number, message: string, retryAfterSeconds?: number) {
    const style = this.request.routeOptions.config?.errorStyle ?? 'ollama'
    if (retryAfterSeconds != null) this.header('retry-after', String(retryAfterSeconds))
    return this.code(statusCode).type('application/json; charset=utf-8').send(errorBody(style, statusCode, message))
  })

  fastify.setErrorHandler(function (err: any, request, reply) {
    if (err instanceof LeaseError || err instanceof GatewayError) {
      if (err.statusCode === 499) {
        // The client has gone: nobody reads an answer.
        return reply.code(499).send()
      }
      return reply.sendError(err.statusCode, err.message, err.retryAfterSeconds)
    }
    if (err.validation != null) return reply.sendError(400, err.message)
    const status = typeof err.statusCode === 'number' && err.statusCode >= 400 && err.statusCode < 600 ? err.statusCode : 500
    if (status >= 500) {
      request.log.error({ err }, 'request failed')
      return reply.sendError(status, status === 500 ? 'internal gateway error' : err.message)
    }
    const explain = FASTIFY_MESSAGES[err.code as string]
    // 415 is not one of the gateway's answers: a garbled Content-Type is bad input like any other (400).
    return reply.sendError(err.code === 'FST_ERR_CTP_INVALID_MEDIA_TYPE' ? 400 : status, explain != null ? explain(err) : err.message)
  })

  fastify.setNotFoundHandler(function (request, reply) {
    return reply.sendError(404, `no route ${request.method} ${request.url.split('?')[0]}`)
  })
}, { name: 'errors', fastify: '5.x' })
