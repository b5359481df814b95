import { timingSafeEqual } from 'node:crypto'
import fp from 'fastify-plugin'
import type { FastifyReply, FastifyRequest } from 'fastify'
import { sha256, type ApiKey } from '../services/api-keys.js'

/**
 * Who may call a route:
 * - `open`: anyone (`/`, health checks, version probes);
 * - `api-key`: when keys are configured (API_KEYS, the `api_keys` table or the inventory file's
 *   `apiKeys`), one of them (or the admin token);
 * - `admin`: when ADMIN_TOKEN is set, that token; when only keys are configured, an API key (a
 *   reservation takes GPUs just like a proxied request); when neither, anyone.
 */
export type AuthLevel = 'open' | 'api-key' | 'admin'

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

/**
 * API keys and the admin token, checked in `onRequest` (before a body is read) from each route's
 * `config.auth`. A refusal is a 401 in the route's error style with `WWW-Authenticate: Bearer`.
 * Unknown paths are not guarded: they answer 404 whoever asks.
 */
export default fp(async function auth (fastify) {
  const config = fastify.maestroConfig
  const keys = fastify.apiKeys
  const adminToken = config.adminToken != null ? sha256(config.adminToken) : undefined

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
    if (level === 'admin') {
      if (adminToken !== undefined) return credential === 'admin'
      return !keys.configured || credential !== null
    }
    return !keys.configured || credential !== null
  }

  fastify.decorateRequest('credential', null)
  fastify.addHook('onRequest', async (request: FastifyRequest, reply: FastifyReply) => {
    if (request.is404) return
    if (adminToken === undefined && !keys.configured) return
    const token = bearerToken(request.headers.authorization)
    const credential = identify(token)
    request.credential = credential
    if (allowed(request.routeOptions.config?.auth ?? 'api-key', credential)) return
    // Do not read a body nobody is allowed to send: answer, then close the connection.
    if (request.headers['transfer-encoding'] != null || Number(request.headers['content-length']) > 0) {
      reply.header('connection', 'close')
    }
    reply.header('www-authenticate', token === undefined ? REALM : `${REALM}, error="invalid_token"`)
    return reply.sendError(401, token === undefined
      ? 'authentication required: send Authorization: Bearer <key>'
      : 'invalid API key or token')
  })
}, { name: 'auth', dependencies: ['config', 'errors', 'api-keys'], fastify: '5.x' })
