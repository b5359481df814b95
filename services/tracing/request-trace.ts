/**
 * What the gateway tells a request's trace (CONTRACT 17, tracing), and the GenAI names it uses.
 * Plain types and strings only: the OpenTelemetry SDK lives in ./otel-request-tracer.ts, which is
 * imported (dynamically) only when OTEL_EXPORTER_OTLP_ENDPOINT is set, so with tracing off no
 * OpenTelemetry module is loaded and every call site is one null check (`exchange.trace?.…`).
 */
import type { Readable } from 'node:stream'
import type { IncomingHttpHeaders } from 'node:http'
import type { ModelKind } from '../fleet/inventory.js'

/** The upstream a request is sent to: a part of an inventory assignment. */
export interface TracedUpstream {
  name: string
  kind: ModelKind
  /** `http://ip:port` */
  url: string
  ip: string
  port: number
}

/** What a request's trace is told when it ends. */
export interface TracedOutcome {
  /** The status the client got (499: it left before any answer). */
  status: number
  /** The model the request was leased for (the inventory's spelling, an alias's target). */
  model?: string
  /** The counts the answer carried, when the gateway read them. */
  usage?: TracedUsage
}

export interface TracedUsage {
  /** The whole prompt, cached tokens included (Ollama's `prompt_eval_count`). */
  promptTokens?: number
  cachedPromptTokens?: number
  outputTokens?: number
  /** The model the answer said it came from. */
  model?: string
}

/**
 * One request's spans: a server span for the request, and children for the queue wait, each lease
 * and each upstream exchange, from the times the gateway marks as they happen.
 */
export interface RequestTrace {
  /** A lease was granted after `queuedMs` in the queue: a `queue wait` span, and a `lease` span opens. */
  leased: (assignment: string, gpuIds: readonly string[], queuedMs: number) => void
  /** The lease was released: its span ends. */
  released: () => void
  /**
   * A request to `upstream` for `model` is about to be sent: an upstream exchange span opens. Returns the
   * headers that carry its context upstream (`traceparent`, and `tracestate` when there is one).
   */
  upstreamRequest: (upstream: TracedUpstream, model?: string) => Record<string, string>
  /** The upstream answered with `statusCode`; its span ends when `body` ends or closes (else with the request). */
  upstreamResponse: (statusCode: number, body: Readable) => void
  /** The upstream exchange failed (unreachable, timed out, broken off). */
  upstreamFailed: (reason: string) => void
  /** The client's exchange has ended: the request's span ends. */
  end: (outcome: TracedOutcome) => void
}

/** What a request's span starts from. */
export interface TracedRequest {
  method: string
  /** The route's pattern (`/api/chat`); undefined for a 404. */
  route?: string
  /** The path without its query string. */
  path: string
  scheme: 'http' | 'https'
  /** The client's headers: its `traceparent` (and `tracestate`) are continued. */
  headers: IncomingHttpHeaders
  /** performance.now() when the request arrived. */
  startTime: number
}

export interface RequestTracer {
  start: (request: TracedRequest) => RequestTrace
  /** Export what is buffered and stop (the gateway's onClose). */
  shutdown: () => Promise<void>
}

/** Where and how spans go; from OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SERVICE_NAME, OTEL_EXPORTER_OTLP_HEADERS. */
export interface TracingConfig {
  /** The OTLP/HTTP traces URL: the endpoint with `v1/traces` appended, as the SDK does for this variable. */
  tracesUrl: string
  serviceName: string
  /** `key=value,key2=value2` (values URL-encoded), sent with every export. A secret: never logged. */
  headers?: string
}

/** The service name when OTEL_SERVICE_NAME is unset. */
export const DEFAULT_SERVICE_NAME = 'ai-maestro-proxy'

/**
 * The traces URL for OTEL_EXPORTER_OTLP_ENDPOINT, the way the OpenTelemetry SDK derives it from the
 * signal-neutral variable: a `/` if missing, then `v1/traces`. Throws for a URL that does not parse.
 */
export function otlpTracesUrl (endpoint: string): string {
  const url = new URL(endpoint)
  if (url.protocol !== 'http:' && url.protocol !== 'https:') throw new Error(`an http(s) URL is needed, got ${url.protocol}`)
  return (endpoint.endsWith('/') ? endpoint : endpoint + '/') + 'v1/traces'
}

/*
 * GenAI semantic conventions (still "development" in @opentelemetry/semantic-conventions, whose
 * `incubating` entry point is 770 KB): copied here, as that package advises for unstable names.
 */
export const GEN_AI = {
  OPERATION_NAME: 'gen_ai.operation.name',
  /** Older name of gen_ai.provider.name; both are set (tools read one or the other). */
  SYSTEM: 'gen_ai.system',
  PROVIDER_NAME: 'gen_ai.provider.name',
  REQUEST_MODEL: 'gen_ai.request.model',
  RESPONSE_MODEL: 'gen_ai.response.model',
  USAGE_INPUT_TOKENS: 'gen_ai.usage.input_tokens',
  USAGE_CACHE_READ_INPUT_TOKENS: 'gen_ai.usage.cache_read.input_tokens',
  USAGE_OUTPUT_TOKENS: 'gen_ai.usage.output_tokens'
} as const

/** `gen_ai.operation.name` of each leased route the gateway serves; other routes carry none. */
const OPERATIONS: Record<string, string> = {
  '/api/chat': 'chat',
  '/v1/chat/completions': 'chat',
  '/v1/messages': 'chat',
  '/v1/responses': 'chat',
  '/api/generate': 'text_completion',
  '/v1/completions': 'text_completion',
  '/api/embed': 'embeddings',
  '/api/embeddings': 'embeddings',
  '/v1/embeddings': 'embeddings',
  // images and speech: the conventions' name for content other than text
  '/txt2img': 'generate_content',
  '/img2img': 'generate_content',
  '/v1/images/generations': 'generate_content',
  '/v1/audio/speech': 'generate_content',
  '/v1/audio/transcriptions': 'generate_content',
  '/v1/audio/translations': 'generate_content'
}

export function genAiOperation (route: string | undefined): string | undefined {
  return route != null ? OPERATIONS[route] : undefined
}

/** `gen_ai.system` of the servers of each kind: what actually runs the model, whatever API the client spoke. */
const SYSTEMS: Record<ModelKind, string> = {
  llm: 'ollama',
  diffusor: 'stable_diffusion',
  speech: 'speech_server'
}

export function genAiSystem (kind: ModelKind): string {
  return SYSTEMS[kind]
}
