import { createHash, timingSafeEqual } from 'node:crypto'
import fp from 'fastify-plugin'
import type { FastifyReply, FastifyRequest } from 'fastify'

/**
 * Who may call a route:
 * - `open`: anyone (`/`, health checks, version probes);
 * - `api-key`: when API_KEYS is set, one of its keys (or the admin token);
 * - `admin`: when ADMIN_TOKEN is set, that token; when only API_KEYS is set, an API key (a
 *   reservation takes GPUs just like a proxied request); when neither is set, anyone.
 */
export type AuthLevel = 'open' | 'api-key' | 'admin'

declare module 'fastify' {
  interface FastifyContextConfig {
    /** Who may call this route; `api-key` when unset, so a route nobody thought about is not left open. */
    auth?: AuthLevel
  }
}

const REALM = 'Bearer realm="ai-maestro-proxy"'

/** SHA-256 first, so every comparison is over 32 bytes and its time says nothing about a key's length. */
const digest = (text: string): Buffer => createHash('sha256').update(text, 'utf8').digest()

/** The token of `Authorization: Bearer <token>` (scheme case-insensitive, as RFC 9110 says), else undefined. */
export function bearerToken (header: string | undefined): string | undefined {
  if (typeof header !== 'string') return undefined
  const match = /^bearer[ \t]+(\S+)[ \t]*$/i.exec(header)
  return match?.[1]
}

/** True when `token` is one of `secrets`; every secret is compared, in constant time. */
function matchesAny (token: string | undefined, secrets: Buffer[]): boolean {
  if (token === undefined) return false
  const presented = digest(token)
  let found = false
  for (const secret of secrets) found = timingSafeEqual(presented, secret) || found
  return found
}

/**
 * API keys and the admin token, checked in `onRequest` (before a body is read) from each route's
 * `config.auth`. A refusal is a 401 in the route's error style with `WWW-Authenticate: Bearer`.
 * Unknown paths are not guarded: they answer 404 whoever asks.
 */
export default fp(async function auth (fastify) {
  const config = fastify.maestroConfig
  const apiKeys = config.apiKeys.map(digest)
  const adminToken = config.adminToken != null ? [digest(config.adminToken)] : []
  if (apiKeys.length === 0 && adminToken.length === 0) return

  /** The secrets a route accepts, or null when it is open to anyone under this configuration. */
  const accepted = (level: AuthLevel): Buffer[] | null => {
    if (level === 'open') return null
    if (level === 'admin') {
      if (adminToken.length > 0) return adminToken
      return apiKeys.length > 0 ? apiKeys : null
    }
    return apiKeys.length > 0 ? [...apiKeys, ...adminToken] : null
  }

  fastify.addHook('onRequest', async (request: FastifyRequest, reply: FastifyReply) => {
    if (request.is404) return
    const secrets = accepted(request.routeOptions.config?.auth ?? 'api-key')
    if (secrets === null) return
    const token = bearerToken(request.headers.authorization)
    if (matchesAny(token, secrets)) return
    // Do not read a body nobody is allowed to send: answer, then close the connection.
    if (request.headers['transfer-encoding'] != null || Number(request.headers['content-length']) > 0) {
      reply.header('connection', 'close')
    }
    reply.header('www-authenticate', token === undefined ? REALM : `${REALM}, error="invalid_token"`)
    return reply.sendError(401, token === undefined
      ? 'authentication required: send Authorization: Bearer <key>'
      : 'invalid API key or token')
  })
}, { name: 'auth', dependencies: ['config', 'errors'], fastify: '5.x' })
