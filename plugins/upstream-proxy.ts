import type { Readable } from 'node:stream'
import fp from 'fastify-plugin'
import replyFrom, { type FastifyReplyFromHooks } from '@fastify/reply-from'
import type { FastifyReply, FastifyRequest } from 'fastify'
import { clientResponseHeaders, upstreamRequestHeaders } from '../services/http/http-headers.js'
import type { Assignment } from '../services/fleet/inventory.js'
import { SlowReaderLimit } from '../services/http/slow-reader.js'
import { bodyTooLarge, refusedBody, timedOut, unreachable } from '../services/http/upstream-failure.js'

declare module 'fastify' {
  interface FastifyInstance {
    /** Forward to a chosen upstream without a lease (model info, uploads). */
    forwardTo: (request: FastifyRequest, reply: FastifyReply, assignment: Assignment, path: string, opts?: ForwardOptions) => FastifyReply
    /**
     * What every forward to `assignment` sends besides its body: the route's own path with no query
     * string, the client's headers made fit for the upstream. Spread into `reply.from`'s options.
     */
    upstreamRequestOptions: (request: FastifyRequest, assignment: Assignment) => Pick<FastifyReplyFromHooks, 'queryString' | 'rewriteRequestHeaders'>
  }
}

export interface ForwardOptions {
  /** A JSON body to send instead of the client's (which is then streamed through as it comes). */
  body?: string
  /** Read a small JSON answer before it is passed on (e.g. to remember where an upload went). */
  onJsonAnswer?: (answer: unknown, statusCode: number) => Promise<void>
}

/** Largest answer `onJsonAnswer` reads; anything bigger is passed on unread. */
const INSPECT_LIMIT = 64 * 1024

/** How much longer than UPSTREAM_HEADERS_TIMEOUT_MS a streamed answer's client connection may stay idle. */
const CLIENT_IDLE_MARGIN_MS = 2000

/** The upstream path is always the route's own: the client's query string is not passed on. */
const noQueryString = (): string => ''

/** The HTTP client to the upstreams (@fastify/reply-from, undici), and forwarding without a lease. */
export default fp(async function upstreamProxy (fastify) {
  const config = fastify.maestroConfig
  await fastify.register(replyFrom, {
    undici: {
      headersTimeout: config.upstreamHeadersTimeoutMs,
      // a stream that sends nothing for this long is dead: free its GPUs
      bodyTimeout: config.upstreamHeadersTimeoutMs,
      keepAliveTimeout: 4000,
      connect: { timeout: 5000 }
    },
    disableRequestLogging: true
  })

  // A client that stops reading would keep a streamed answer's GPUs for ever (backpressure pauses
  // the upstream, so it never ends). Once an answer streams, a connection on which nothing moves
  // for longer than a silent upstream is allowed is closed; so is one whose writer has been held
  // back by the client that long in all (one reading a little now and then is never silent).
  // Either ends the exchange and its lease. Longer by a margin: a silent upstream must be given
  // up first (undici's body timeout, whose timers are coarse), so that its stream can still end
  // with an error record on this connection.
  const slowReaders = new SlowReaderLimit(config.upstreamHeadersTimeoutMs + CLIENT_IDLE_MARGIN_MS)
  fastify.addHook('onSend', async (_request, reply, payload) => {
    if (typeof (payload as { pipe?: unknown } | null)?.pipe === 'function') {
      reply.raw.setTimeout(config.upstreamHeadersTimeoutMs + CLIENT_IDLE_MARGIN_MS, () => reply.raw.destroy())
      slowReaders.watch(reply.raw)
    }
    return payload
  })

  // The client's Authorization carries the gateway's own key or token: never pass it on.
  // (plugins/api-keys.ts registers after this plugin: looked up on the request's path)
  const dropAuthorization = (): boolean => config.adminToken != null || fastify.apiKeys.configured
  fastify.decorate('upstreamRequestOptions', function (request: FastifyRequest, assignment: Assignment) {
    return {
      queryString: noQueryString,
      rewriteRequestHeaders: (_req: unknown, headers: Record<string, any>) => upstreamRequestHeaders(headers, {
        host: assignment.host,
        requestId: request.exchange.requestId,
        dropAuthorization: dropAuthorization(),
        trace: request.exchange.trace?.upstreamRequest(assignment, request.exchange.model)
      })
    }
  })

  fastify.decorate('forwardTo', function (request: FastifyRequest, reply: FastifyReply, assignment: Assignment, path: string, opts: ForwardOptions = {}): FastifyReply {
    const { body, onJsonAnswer } = opts
    return reply.from(assignment.url + path, {
      body,
      // the body was parsed as JSON, whatever Content-Type the client sent (curl -d sends form encoding)
      contentType: body != null ? 'application/json' : undefined,
      ...fastify.upstreamRequestOptions(request, assignment),
      rewriteHeaders: clientResponseHeaders,
      onResponse: onJsonAnswer == null
        ? undefined
        : (_request, reply, raw) => {
            const res = raw as unknown as { statusCode: number, headers: Record<string, unknown>, stream: Readable }
            if (Number(res.headers['content-length'] ?? INSPECT_LIMIT + 1) > INSPECT_LIMIT) {
              reply.send(res.stream)
              return
            }
            readAll(res.stream).then(async (bytes) => {
              let answer: unknown
              try { answer = JSON.parse(bytes.toString('utf8')) } catch { answer = undefined }
              if (answer !== undefined) await onJsonAnswer(answer, res.statusCode)
              reply.send(bytes)
            }).catch((err) => reply.send(err))
          },
      onError: (reply, { error }) => {
        // A streamed body (upload) cut off at BODY_LIMIT, or refused on its way: the client's fault, not the upstream's.
        if (bodyTooLarge(error)) return reply.sendError(413, 'request body is too large')
        const refused = refusedBody(error, request.body)
        if (refused != null) return reply.header('connection', 'close').sendError(refused.statusCode, refused.message)
        fastify.log.warn({ err: error, assignment: assignment.name }, 'upstream failed')
        request.exchange.upstreamFailed(assignment.name, unreachable(error) ? 'unreachable' : timedOut(error) ? 'timeout' : 'failed')
        if (timedOut(error)) reply.sendError(504, `upstream '${assignment.name}' sent no answer in time`)
        else reply.sendError(502, `upstream '${assignment.name}' is unreachable`)
      }
    })
  })
}, { name: 'upstream-proxy', dependencies: ['config', 'errors', 'exchange'], fastify: '5.x' })

async function readAll (stream: Readable): Promise<Buffer> {
  const chunks: Buffer[] = []
  for await (const chunk of stream) chunks.push(chunk as Buffer)
  return Buffer.concat(chunks)
}
