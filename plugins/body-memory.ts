import { pipeline, Transform, type TransformCallback } from 'node:stream'
import fp from 'fastify-plugin'
import { Gauge } from 'prom-client'
import { BodyBudget, type BodyHold } from '../services/http/body-budget.js'
import { GatewayError } from '../services/http/errors.js'

declare module 'fastify' {
  interface FastifyContextConfig {
    /** The route streams its body through unread (uploads): it holds none of BODY_MEMORY_LIMIT. */
    streamedBody?: boolean
  }
  interface FastifyRequest {
    /** This request's bytes in BODY_MEMORY_LIMIT, given back when its response closes. */
    bodyHold: BodyHold
  }
}

/** Seconds a client refused for lack of body memory is told to wait. */
const RETRY_AFTER_S = 5

/**
 * BODY_MEMORY_LIMIT: the bytes of request bodies held by waiting and in-flight requests. A declared
 * length is held before a byte is read, a chunked body chunk by chunk; past the budget the request
 * gets 503 with Retry-After. Each request gives its bytes back once, when its response closes.
 */
export default fp(async function bodyMemory (fastify) {
  const budget = new BodyBudget(fastify.maestroConfig.bodyMemoryLimit)
  fastify.decorateRequest('bodyHold', null as unknown as BodyHold)
  // eslint-disable-next-line no-new
  new Gauge({
    name: 'maestro_body_memory_bytes',
    help: 'Bytes of request bodies held right now by waiting and in-flight requests (bounded by BODY_MEMORY_LIMIT)',
    registers: [fastify.metrics.registry],
    collect () { this.set(budget.held) }
  })
  fastify.addHook('onRequest', (request, reply, done) => {
    const hold = budget.hold()
    request.bodyHold = hold
    // however the exchange ends: completed, failed, or the client gone
    request.exchange.onClose(() => hold.release())
    done()
  })
  fastify.addHook('preParsing', async (request, _reply, payload) => {
    if (request.routeOptions.config?.streamedBody === true) return payload
    const declared = Number(request.headers['content-length'])
    // (The connection stays open: Node reads the unread body and drops it, holding nothing, so the
    // client can finish sending and read the 503 instead of seeing its upload cut off.)
    if (declared > 0 && !request.bodyHold.add(declared)) throw noBodyMemory()
    if (request.headers['transfer-encoding'] == null) return payload
    // pipeline, not pipe: an error upstream of here (BODY_LIMIT's 413) reaches the parser through it.
    return pipeline(payload, new HeldBody(request.bodyHold), () => {})
  })
}, { name: 'body-memory', dependencies: ['config', 'exchange', 'metrics', 'request-body'], fastify: '5.x' })

function noBodyMemory (): GatewayError {
  return new GatewayError(503, 'the gateway holds as many request bodies as it may (BODY_MEMORY_LIMIT); retry later', RETRY_AFTER_S)
}

/** A chunked body, its bytes added to the request's hold as they arrive; 503 once they do not fit. */
class HeldBody extends Transform {
  /** Fastify checks this against its own limit. */
  receivedEncodedLength = 0

  constructor (private readonly hold: BodyHold) {
    super()
  }

  override _transform (chunk: Buffer, _encoding: BufferEncoding, callback: TransformCallback): void {
    this.receivedEncodedLength += chunk.length
    if (!this.hold.add(chunk.length)) {
      callback(noBodyMemory())
      return
    }
    callback(null, chunk)
  }
}
