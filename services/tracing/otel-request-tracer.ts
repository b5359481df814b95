/**
 * Request traces over OpenTelemetry (CONTRACT 17): the SDK's tracer provider, a batch processor
 * and the OTLP/HTTP (JSON) exporter, and the spans of one request made from the times the gateway
 * marks. Imported dynamically by plugins/tracing.ts only when OTEL_EXPORTER_OTLP_ENDPOINT is set.
 *
 * The provider is not registered globally (no `trace.setGlobalTracerProvider`, no context
 * manager): a host app embedding the gateway keeps its own OpenTelemetry setup, and the gateway's
 * spans are parented explicitly, never through async context.
 */
import type { Readable } from 'node:stream'
import { performance } from 'node:perf_hooks'
import {
  ROOT_CONTEXT, SpanKind, SpanStatusCode, defaultTextMapGetter, defaultTextMapSetter, trace,
  type Attributes, type Context, type Span, type Tracer
} from '@opentelemetry/api'
import { W3CTraceContextPropagator, parseKeyPairsIntoRecord } from '@opentelemetry/core'
import { detectResources, envDetector, resourceFromAttributes } from '@opentelemetry/resources'
import { BasicTracerProvider, BatchSpanProcessor } from '@opentelemetry/sdk-trace-base'
import { OTLPTraceExporter } from '@opentelemetry/exporter-trace-otlp-http'
import {
  ATTR_ERROR_TYPE, ATTR_HTTP_REQUEST_METHOD, ATTR_HTTP_RESPONSE_STATUS_CODE, ATTR_HTTP_ROUTE, ATTR_SERVER_ADDRESS,
  ATTR_SERVER_PORT, ATTR_SERVICE_NAME, ATTR_SERVICE_VERSION, ATTR_URL_PATH, ATTR_URL_SCHEME
} from '@opentelemetry/semantic-conventions'
import {
  GEN_AI, genAiOperation, genAiSystem,
  type RequestTrace, type RequestTracer, type TracedOutcome, type TracedRequest, type TracedUpstream, type TracingConfig
} from './request-trace.js'

/**
 * A performance.now() mark as epoch milliseconds. Spans are given these, not the marks themselves:
 * the SDK anchors a performance mark to the clock per span, so two spans' shared instant (a wait's
 * end, a lease's start) would differ by the anchors' drift.
 */
const epochMs = (mark: number): number => performance.timeOrigin + mark

/** The gateway's own attributes (no convention names these). */
const MAESTRO = {
  ASSIGNMENT: 'maestro.assignment',
  GPUS: 'maestro.gpus',
  QUEUE_MS: 'maestro.queue_ms'
} as const

export function createRequestTracer (config: TracingConfig, serviceVersion: string): RequestTracer {
  const exporter = new OTLPTraceExporter({
    url: config.tracesUrl,
    // values URL-decoded, as the SDK reads the variable itself
    headers: config.headers != null ? parseKeyPairsIntoRecord(config.headers) : undefined
  })
  const provider = new BasicTracerProvider({
    // OTEL_RESOURCE_ATTRIBUTES from the environment; the service's own name and version win
    resource: detectResources({ detectors: [envDetector] }).merge(resourceFromAttributes({
      [ATTR_SERVICE_NAME]: config.serviceName,
      [ATTR_SERVICE_VERSION]: serviceVersion
    })),
    spanProcessors: [new BatchSpanProcessor(exporter)]
  })
  const tracer = provider.getTracer('ai-maestro-proxy', serviceVersion)
  const propagator = new W3CTraceContextPropagator()
  return {
    start: (request) => new OtelRequestTrace(tracer, propagator, request),
    shutdown: async () => await provider.shutdown()
  }
}

class OtelRequestTrace implements RequestTrace {
  private readonly root: Span
  /** The context the request's children hang in. */
  private readonly context: Context
  private readonly operation?: string
  private lease?: Span
  private upstream?: Span
  private upstreamTarget?: TracedUpstream
  private ended = false

  constructor (private readonly tracer: Tracer, private readonly propagator: W3CTraceContextPropagator, request: TracedRequest) {
    // The client's traceparent (and tracestate), when valid, is the parent; otherwise a new trace.
    const parent = propagator.extract(ROOT_CONTEXT, request.headers, defaultTextMapGetter)
    this.operation = genAiOperation(request.route)
    const attributes: Attributes = {
      [ATTR_HTTP_REQUEST_METHOD]: request.method,
      [ATTR_URL_PATH]: request.path,
      [ATTR_URL_SCHEME]: request.scheme
    }
    if (request.route != null) attributes[ATTR_HTTP_ROUTE] = request.route
    if (this.operation != null) attributes[GEN_AI.OPERATION_NAME] = this.operation
    this.root = tracer.startSpan(request.route != null ? `${request.method} ${request.route}` : request.method,
      { kind: SpanKind.SERVER, startTime: epochMs(request.startTime), attributes }, parent)
    this.context = trace.setSpan(parent, this.root)
  }

  leased (assignment: string, gpuIds: readonly string[], queuedMs: number): void {
    const now = epochMs(performance.now())
    this.tracer.startSpan('queue wait', {
      startTime: now - queuedMs,
      attributes: { [MAESTRO.QUEUE_MS]: queuedMs }
    }, this.context).end(now)
    this.lease?.end(now)
    this.lease = this.tracer.startSpan('lease', {
      startTime: now,
      attributes: { [MAESTRO.ASSIGNMENT]: assignment, [MAESTRO.GPUS]: gpuIds.join(',') }
    }, this.context)
  }

  released (): void {
    // The upstream exchange ends on its own signals (its answer's end, a failure reported just
    // after the release): a lease is often released before the failure that freed it is told.
    this.lease?.end(epochMs(performance.now()))
    this.lease = undefined
  }

  upstreamRequest (upstream: TracedUpstream, model?: string): Record<string, string> {
    const now = epochMs(performance.now())
    // a retry on the next candidate: the previous exchange is over
    this.endUpstream(now)
    const system = genAiSystem(upstream.kind)
    const attributes: Attributes = {
      [ATTR_HTTP_REQUEST_METHOD]: 'POST',
      [ATTR_SERVER_ADDRESS]: upstream.ip,
      [ATTR_SERVER_PORT]: upstream.port,
      [MAESTRO.ASSIGNMENT]: upstream.name,
      [GEN_AI.SYSTEM]: system,
      [GEN_AI.PROVIDER_NAME]: system
    }
    if (this.operation != null) attributes[GEN_AI.OPERATION_NAME] = this.operation
    if (model != null) attributes[GEN_AI.REQUEST_MODEL] = model
    // GenAI client spans are named `{operation} {model}`
    const name = this.operation != null && model != null ? `${this.operation} ${model}` : `POST ${upstream.name}`
    this.upstream = this.tracer.startSpan(name, { kind: SpanKind.CLIENT, startTime: now, attributes }, this.context)
    this.upstreamTarget = upstream
    const headers: Record<string, string> = {}
    this.propagator.inject(trace.setSpan(this.context, this.upstream), headers, defaultTextMapSetter)
    return headers
  }

  upstreamResponse (statusCode: number, body: Readable): void {
    const span = this.upstream
    if (span == null) return
    span.setAttribute(ATTR_HTTP_RESPONSE_STATUS_CODE, statusCode)
    if (statusCode >= 500) span.setStatus({ code: SpanStatusCode.ERROR }).setAttribute(ATTR_ERROR_TYPE, String(statusCode))
    const end = (): void => { if (this.upstream === span) this.endUpstream(epochMs(performance.now())) }
    body.once('end', end)
    body.once('close', end)
  }

  upstreamFailed (reason: string): void {
    const span = this.upstream
    if (span == null) return
    span.setStatus({ code: SpanStatusCode.ERROR, message: reason }).setAttribute(ATTR_ERROR_TYPE, reason)
    this.endUpstream(epochMs(performance.now()))
  }

  end (outcome: TracedOutcome): void {
    if (this.ended) return
    this.ended = true
    const now = epochMs(performance.now())
    // an exchange without a stream to watch (forwarded without a lease) ends with the response
    this.endUpstream(now)
    const root = this.root
    if (outcome.status === 499) {
      root.setAttribute(ATTR_ERROR_TYPE, 'client_closed')
    } else {
      root.setAttribute(ATTR_HTTP_RESPONSE_STATUS_CODE, outcome.status)
      if (outcome.status >= 500) root.setStatus({ code: SpanStatusCode.ERROR }).setAttribute(ATTR_ERROR_TYPE, String(outcome.status))
    }
    if (outcome.model != null) root.setAttribute(GEN_AI.REQUEST_MODEL, outcome.model)
    const target = this.upstreamTarget
    if (target != null) {
      const system = genAiSystem(target.kind)
      root.setAttributes({
        [GEN_AI.SYSTEM]: system,
        [GEN_AI.PROVIDER_NAME]: system,
        [ATTR_SERVER_ADDRESS]: target.ip,
        [ATTR_SERVER_PORT]: target.port,
        [MAESTRO.ASSIGNMENT]: target.name
      })
      const responseModel = outcome.usage?.model ?? outcome.model
      if (responseModel != null) root.setAttribute(GEN_AI.RESPONSE_MODEL, responseModel)
    }
    const usage = outcome.usage
    if (usage?.promptTokens != null) root.setAttribute(GEN_AI.USAGE_INPUT_TOKENS, usage.promptTokens)
    if (usage?.cachedPromptTokens != null) root.setAttribute(GEN_AI.USAGE_CACHE_READ_INPUT_TOKENS, usage.cachedPromptTokens)
    if (usage?.outputTokens != null) root.setAttribute(GEN_AI.USAGE_OUTPUT_TOKENS, usage.outputTokens)
    root.end(now)
  }

  private endUpstream (at: number): void {
    this.upstream?.end(at)
    this.upstream = undefined
  }
}
