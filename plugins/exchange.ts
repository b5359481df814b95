import fp from 'fastify-plugin'
import { Exchange, requestIdFrom } from '../services/http/exchange.js'

declare module 'fastify' {
  interface FastifyRequest {
    /** The request's exchange: its id, its upstream, and the one place its end is heard. */
    exchange: Exchange
  }
}

/**
 * Every request's exchange, made first of all. The response's 'close' fires however an exchange
 * ends; the exchange listens for it once and tells everyone who asked (`exchange.onClose`). A
 * listener of each plugin's own made eleven on a proxied response, and Node then printed a
 * listener-leak warning, stack trace and all, on every request.
 */
export default fp(async function exchange (fastify) {
  fastify.decorateRequest('exchange', null as unknown as Exchange)
  fastify.addHook('onRequest', (request, reply, done) => {
    // Attached before any await: attached after the client has gone, 'close' never fires.
    const exchange = new Exchange(requestIdFrom(request.headers['x-request-id']))
    request.exchange = exchange
    reply.raw.once('close', () => exchange.close())
    reply.header('x-request-id', exchange.requestId)
    done()
  })
}, { name: 'exchange', fastify: '5.x' })
