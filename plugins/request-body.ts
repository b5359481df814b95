import { Transform, type TransformCallback } from 'node:stream'
import fp from 'fastify-plugin'
import type { FastifyRequest } from 'fastify'
import { TypeCompiler } from '@sinclair/typebox/compiler'
import { ValueErrorType, type ValueError } from '@sinclair/typebox/errors'
import type { TSchema } from '@sinclair/typebox'
import { caseVariantKey } from '../services/http/case-variant-keys.js'
import { GatewayError } from '../services/http/errors.js'
import { fingerprintOf, fingerprintPathOf, type PromptFingerprint } from '../services/scheduling/prefix-fingerprint.js'

declare module 'fastify' {
  interface FastifyRequest {
    /** The request body exactly as received, for forwarding byte for byte. */
    rawBody?: string
    /**
     * Forget the parsed body (all but its `model`) and the raw text: a route that has taken what it
     * forwards (and the few fields it reads) calls this before it waits for a lease, so a waiting
     * request holds one copy.
     */
    forgetBody: () => void
    /**
     * The prompt's fingerprints (scheduler v3), taken from the parsed body when the route forgets
     * it: a second parse of the forwarded text would hold another copy of a large body.
     */
    promptFingerprint?: PromptFingerprint
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
  fastify.decorateRequest('promptFingerprint', undefined)
  fastify.decorateRequest('forgetBody', function (this: FastifyRequest) {
    const path = fingerprintPathOf(this.routeOptions.url)
    if (path !== undefined && this.body != null) {
      const session = this.headers['x-session-id']
      this.promptFingerprint = fingerprintOf(path, this.body, typeof session === 'string' ? session : undefined)
    }
    // Only the model stays (the access log names it, found or not).
    const model = (this.body as { model?: unknown } | undefined)?.model
    this.body = typeof model === 'string' ? { model } : undefined
    this.rawBody = undefined
  })
  fastify.removeAllContentTypeParsers()
  fastify.addContentTypeParser('*', { parseAs: 'string', bodyLimit }, function (request, body, done) {
    const raw = body as string
    request.rawBody = raw
    if (raw.trim() === '') {
      done(null, undefined)
      return
    }
    let parsed: unknown
    try {
      // JSON.parse is iterative in V8: 100k nested arrays parse in ~30 ms, no stack overflow.
      parsed = JSON.parse(raw)
    } catch (err) {
      const type = request.headers['content-type'] ?? ''
      const e = new Error(/^multipart\//i.test(type)
        ? `request body must be JSON, not ${type.split(';')[0]}`
        : `invalid JSON body: ${(err as Error).message}`) as Error & { statusCode: number }
      e.statusCode = 400
      done(e, undefined)
      return
    }
    const variant = parsed != null && typeof parsed === 'object' && !Array.isArray(parsed) ? caseVariantKey(parsed) : undefined
    if (variant !== undefined) {
      done(new GatewayError(400, `body key ${JSON.stringify(variant)} is a case variant of a key the gateway reads; send it exactly as ${JSON.stringify(foldedName(variant))}`), undefined)
      return
    }
    done(null, parsed)
  })

  // BODY_LIMIT for every route, streamed ones (uploads) too: a declared length over the limit is
  // refused before a byte is read; a chunked body is cut off where it crosses the limit. (Node
  // itself never delivers more than a declared Content-Length.)
  fastify.addHook('preParsing', async (request, reply, payload) => {
    if (Number(request.headers['content-length']) > bodyLimit) {
      reply.header('connection', 'close')
      throw bodyTooLarge(bodyLimit)
    }
    if (request.headers['transfer-encoding'] == null) return payload
    return payload.pipe(new LimitedBody(bodyLimit, () => reply.header('connection', 'close')))
  })

  fastify.setValidatorCompiler(({ schema }) => {
    const check = TypeCompiler.Compile(schema as TSchema)
    return (data: unknown) => {
      if (check.Check(data)) return { value: data }
      const first = check.Errors(data).First()
      const error = new Error(first == null
        ? 'invalid request'
        : first.type === ValueErrorType.StringMaxLength
          ? `${first.path.slice(1).replace(/\//g, '.')} is longer than ${(first.schema as unknown as { maxLength: number }).maxLength} characters`
          : describe(first))
      return { error }
    }
  })
}, { name: 'request-body', dependencies: ['config'], fastify: '5.x' })

/** The error Fastify's own parsers give (413), so every route words it alike. */
function bodyTooLarge (limit: number): Error {
  return Object.assign(new Error(`request body is larger than ${limit} bytes`), { statusCode: 413, code: 'FST_ERR_CTP_BODY_TOO_LARGE' })
}

/** The key a case variant imitates, for the error message. */
function foldedName (key: string): string {
  return key.replace(/\u212a/g, 'k').replace(/\u017f/g, 's').toLowerCase()
}

/** Passes a body through until it crosses the limit, then fails with 413. */
class LimitedBody extends Transform {
  /** Fastify checks this against its own limit too. */
  receivedEncodedLength = 0

  constructor (private readonly limit: number, private readonly onExceeded: () => void) {
    super()
  }

  override _transform (chunk: Buffer, _encoding: BufferEncoding, callback: TransformCallback): void {
    this.receivedEncodedLength += chunk.length
    if (this.receivedEncodedLength > this.limit) {
      this.onExceeded()
      callback(bodyTooLarge(this.limit))
      return
    }
    callback(null, chunk)
  }
}

/** The first schema error as `<field>: <what is wrong>`; a union (an id, a weight) says what it takes. */
function describe ({ path, message, type, schema }: ValueError): string {
  const root = path === '' || path === '/'
  if (root && type === ValueErrorType.ObjectMinProperties) return 'request body must name at least one field'
  if (root) return 'request body must be a JSON object'
  if (type === ValueErrorType.Union && typeof schema.description === 'string') message = `must be ${schema.description}`
  if (path === '/model') return 'model is required'
  return `${path.slice(1).replace(/\//g, '.')}: ${message}`
}
