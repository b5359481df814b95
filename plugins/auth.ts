import { timingSafeEqual } from 'node:crypto'
import fp from 'fastify-plugin'
import type { FastifyReply, FastifyRequest } from 'fastify'
import { sha256, type ApiKey } from '../services/clients/api-keys.js'
import { isLoopbackAddress } from '../services/clients/loopback.js'

/**
 * Who may call a route:
 * - `open`: anyone (`/`, health checks, version probes);
 * - `api-key`: when keys are configured (API_KEYS, the `api_keys` table or the inventory file's
 *   `apiKeys`), one of them (or the admin token);
 * - `lease` (the lease API's writes): when ADMIN_TOKEN is set, that token; when only keys are
 *   configured, an API key (a reservation takes GPUs just like a proxied request); when neither,
 *   anyone;
 * - `admin` (the admin API, `/api/pull`, cache clearing): when ADMIN_TOKEN is set, that token;
 *   without it, only clients on the loopback interface when no keys are configured, and nobody
 *   when keys are (a key must not rewrite the fleet: 403 until ADMIN_TOKEN is set).
 */
export type AuthLevel = 'open' | 'api-key' | 'lease' | 'admin'

declare module 'fastify' {
  interface FastifyContextConfig {
    /** Who may call this route; `api-key` when unset, so a route nobody thought about is not left open. */
    auth?: AuthLevel
  }
  interface FastifyRequest {
    /** The credential the request presented and the gateway knows: an API key, the admin token, or null. */
    credential: ApiKey | 'admin' | null
  }
}

const REALM = 'Bearer realm="ai-maestro-proxy"'

/** The token of `Authorization: Bearer <token>` (scheme case-insensitive, as RFC 9110 says), else undefined. */
export function bearerToken (header: string | undefined): string | undefined {
  if (typeof header !== 'string') return undefined
  const match = /^bearer[ \t]+(\S+)[ \t]*$/i.exec(header)
  return match?.[1]
}

/** A request refused in `onRequest` has its body unread: close the connection rather than read it. */
export function closeIfBodyFollows (request: FastifyRequest, reply: FastifyReply): void {
  if (request.headers['transfer-encoding'] != null || Number(request.headers['content-length']) > 0) {
    reply.header('connection', 'close')
  }
}

const NO_ADMIN_TOKEN_REMOTE = 'without ADMIN_TOKEN this route answers only clients on the gateway\'s own machine (loopback): set ADMIN_TOKEN to use it from elsewhere'
const NO_ADMIN_TOKEN_KEYS = 'this route needs ADMIN_TOKEN to be set when API keys are in use'

/**
 * API keys and the admin token, checked in `onRequest` (before a body is read) from each route's
 * `config.auth`. A refusal is a 401 in the route's error style with `WWW-Authenticate: Bearer`,
 * or a 403 naming ADMIN_TOKEN for an admin route that no credential can open while it is unset.
 * Unknown paths are not guarded: they answer 404 whoever asks.
 */
export default fp(async function auth (fastify) {
  const config = fastify.maestroConfig
  const keys = fastify.apiKeys
  const adminToken = config.adminToken != null ? sha256(config.adminToken) : undefined
  if (adminToken === undefined) {
    fastify.log.warn('ADMIN_TOKEN is not set: the admin API, /api/pull and cache clearing answer only clients on the loopback interface (and nobody while API keys are in use); set ADMIN_TOKEN to manage the gateway from elsewhere')
  }

  /** Who the token is: a live key, the admin token (compared in constant time), or nobody. */
  const identify = (token: string | undefined): ApiKey | 'admin' | null => {
    if (token === undefined) return null
    const key = keys.match(token)
    const admin = adminToken !== undefined && timingSafeEqual(sha256(token), adminToken)
    return admin ? 'admin' : key ?? null
  }

  /** Whether this credential may call a route of this level, under the keys configured right now. */
  const allowed = (level: AuthLevel, credential: ApiKey | 'admin' | null): boolean => {
    if (level === 'open') return true
    // Without ADMIN_TOKEN, admin routes are decided in the hook (loopback, or 403).
    if (level === 'admin') return adminToken !== undefined && credential === 'admin'
    if (level === 'lease' && adminToken !== undefined) return credential === 'admin'
    return !keys.configured || credential !== null
  }

  fastify.decorateRequest('credential', null)
  // a callback hook: an async one costs a promise on every request, and nearly all pass
  fastify.addHook('onRequest', (request: FastifyRequest, reply: FastifyReply, done: () => void) => {
    if (request.is404) return done()
    const level = request.routeOptions.config?.auth ?? 'api-key'
    if (level === 'admin' && adminToken === undefined && !keys.configured) {
      // The socket's own address: X-Forwarded-For is whatever the sender wrote, trustProxy or not.
      if (isLoopbackAddress(request.raw.socket?.remoteAddress)) return done()
      closeIfBodyFollows(request, reply)
      reply.sendError(403, NO_ADMIN_TOKEN_REMOTE)
      return
    }
    if (adminToken === undefined && !keys.configured) return done()
    const token = bearerToken(request.headers.authorization)
    const credential = identify(token)
    request.credential = credential
    if (allowed(level, credential)) return done()
    // Do not read a body nobody is allowed to send: answer, then close the connection.
    closeIfBodyFollows(request, reply)
    if (level === 'admin' && adminToken === undefined && credential !== null) {
      reply.sendError(403, NO_ADMIN_TOKEN_KEYS)
      return
    }
    reply.header('www-authenticate', token === undefined ? REALM : `${REALM}, error="invalid_token"`)
    reply.sendError(401, token === undefined
      ? 'authentication required: send Authorization: Bearer <key>'
      : 'invalid API key or token')
  })
}, { name: 'auth', dependencies: ['config', 'errors', 'api-keys'], fastify: '5.x' })
