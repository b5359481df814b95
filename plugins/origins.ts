import fp from 'fastify-plugin'
import type { FastifyReply, FastifyRequest } from 'fastify'
import { OriginPolicy } from '../services/clients/origins.js'
import { closeIfBodyFollows } from './auth.js'

/** Methods that change nothing and use no GPU: a page on any site may send them. */
const SAFE_METHODS = new Set(['GET', 'HEAD', 'OPTIONS'])

/** Enough of a refused origin to recognise it in the answer. */
const ORIGIN_SHOWN = 200

/**
 * Cross-site writes (CONTRACT 18): a POST, PATCH or DELETE that carries an `Origin` the policy does
 * not allow is refused (403) in `onRequest`, before its body is read, unless it carries a valid API
 * key or the admin token (which a page on another site cannot know). Runs after the auth plugin's
 * hook, which has identified the credential. Requests without `Origin` (curl, SDKs, servers) are
 * not looked at.
 */
export default fp(async function origins (fastify) {
  const policy = new OriginPolicy(fastify.maestroConfig.allowedOrigins)

  // a callback hook: an async one costs a promise on every request, and nearly all pass
  fastify.addHook('onRequest', (request: FastifyRequest, reply: FastifyReply, done: () => void) => {
    if (request.is404 || SAFE_METHODS.has(request.method)) return done()
    const origin = request.headers.origin
    if (origin === undefined || request.credential !== null || policy.allows(origin)) return done()
    closeIfBodyFollows(request, reply)
    reply.sendError(403, `requests from origin ${JSON.stringify(origin.slice(0, ORIGIN_SHOWN))} may not change anything here: ` +
      'add it to ALLOWED_ORIGINS, or send an API key or the admin token')
  })
}, { name: 'origins', dependencies: ['config', 'errors', 'auth'], fastify: '5.x' })
