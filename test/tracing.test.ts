// Tracing over OpenTelemetry (CONTRACT 17): spans exported over OTLP/HTTP to a receiver in this
// test, the client's traceparent continued and the upstream exchange's passed on; off, no span and
// no OpenTelemetry module loaded.
import t from 'tap'
import http from 'node:http'
import { createRequire } from 'node:module'
import { setTimeout as sleep } from 'node:timers/promises'
import { Ollama } from 'ollama'
import OpenAI from 'openai'
import { startFleet } from './helpers/gateway.js'
import { Value } from '@sinclair/typebox/value'
import { EnvSchema, resolveConfig, type Env } from '../services/config/config.js'
import { otlpTracesUrl } from '../services/tracing/request-trace.js'

/** Every variable at its default (LEASE_STORE=memory: no Redis needed to resolve). */
const defaults = (): Env => ({ ...Value.Default(EnvSchema, {}) as Env, LEASE_STORE: 'memory' })

type AnyValue = { stringValue?: string, intValue?: number | string, doubleValue?: number, boolValue?: boolean }
interface KeyValue { key: string, value: AnyValue }
interface OtlpSpan {
  traceId: string
  spanId: string
  parentSpanId?: string
  name: string
  kind: number
  startTimeUnixNano: string | number
  endTimeUnixNano: string | number
  attributes?: KeyValue[]
  status?: { code?: number }
}
interface OtlpExport {
  resourceSpans: Array<{ resource?: { attributes?: KeyValue[] }, scopeSpans: Array<{ spans?: OtlpSpan[] }> }>
}

/** An attribute's value, whatever OTLP/JSON type it came as (64-bit integers may come as strings). */
function valueOf (v: AnyValue): string | number | boolean | undefined {
  if (v.stringValue !== undefined) return v.stringValue
  if (v.intValue !== undefined) return Number(v.intValue)
  if (v.doubleValue !== undefined) return v.doubleValue
  return v.boolValue
}
const attributesOf = (list: KeyValue[] = []): Record<string, string | number | boolean | undefined> =>
  Object.fromEntries(list.map((a) => [a.key, valueOf(a.value)]))
const nanos = (v: string | number): bigint => BigInt(v)

/** An OTLP/HTTP collector on 127.0.0.1: decodes each JSON export request and keeps its spans. */
async function startReceiver (): Promise<{
  url: string
  spans: Array<OtlpSpan & { attrs: ReturnType<typeof attributesOf>, resource: ReturnType<typeof attributesOf> }>
  requests: Array<{ path: string, contentType?: string, headers: http.IncomingHttpHeaders }>
  close: () => Promise<void>
}> {
  const spans: Awaited<ReturnType<typeof startReceiver>>['spans'] = []
  const requests: Awaited<ReturnType<typeof startReceiver>>['requests'] = []
  const server = http.createServer((req, res) => {
    const chunks: Buffer[] = []
    req.on('data', (c: Buffer) => chunks.push(c))
    req.on('end', () => {
      requests.push({ path: req.url ?? '', contentType: req.headers['content-type'], headers: req.headers })
      const body = JSON.parse(Buffer.concat(chunks).toString('utf8')) as OtlpExport
      for (const rs of body.resourceSpans) {
        const resource = attributesOf(rs.resource?.attributes)
        for (const ss of rs.scopeSpans) for (const span of ss.spans ?? []) spans.push({ ...span, attrs: attributesOf(span.attributes), resource })
      }
      res.writeHead(200, { 'content-type': 'application/json' }).end('{}')
    })
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  const { port } = server.address() as { port: number }
  return {
    url: `http://127.0.0.1:${port}`,
    spans,
    requests,
    close: async () => await new Promise<void>((resolve) => server.close(() => resolve()))
  }
}

/** Whether `condition` holds within 10 s (looked at every 20 ms). */
async function eventually (condition: () => boolean): Promise<boolean> {
  const deadline = performance.now() + 10_000
  while (!condition()) {
    if (performance.now() > deadline) return false
    await sleep(20)
  }
  return true
}

/**
 * The OpenTelemetry SDK's modules this process has loaded (CommonJS: the require cache has them).
 * The API package is left out: prom-client loads it (a no-op facade) for exemplars, tracing or not.
 */
const requireCache = createRequire(import.meta.url).cache
const loadedOtelModules = (): string[] => Object.keys(requireCache)
  .filter((path) => path.includes('/node_modules/@opentelemetry/') && !path.includes('/node_modules/@opentelemetry/api/'))

const CLIENT_TRACE_ID = '0af7651916cd43dd8448eb211c80319c'
const CLIENT_SPAN_ID = 'b7ad6b7169203331'

// First, before any gateway of this process has tracing on: whatever is loaded now was loaded without it.
t.test('off (OTEL_EXPORTER_OTLP_ENDPOINT unset): no span, no OpenTelemetry module, the client\'s traceparent passes untouched', async (t) => {
  const receiver = await startReceiver()
  t.teardown(receiver.close)
  const fleet = await startFleet(t, {
    gpus: [1],
    upstreams: [{ model: 'llama3', gpus: [0], simulator: { models: ['llama3:latest'], tokens: 4 } }]
  })
  const gw = await fleet.replica()
  const traceparent = `00-${CLIENT_TRACE_ID}-${CLIENT_SPAN_ID}-01`
  const ollama = new Ollama({ host: gw.url, headers: { traceparent } })
  const answer = await ollama.chat({ model: 'llama3', messages: [{ role: 'user', content: 'hello' }], stream: false })
  t.ok(answer.message.content.length > 0, 'answered')
  t.equal(fleet.upstreams[0].requests.at(-1)?.headers.traceparent, traceparent, 'the upstream got the client\'s own traceparent')
  await gw.close()
  t.same(loadedOtelModules(), [], 'no OpenTelemetry SDK module in this process')
  t.same(receiver.requests, [], 'nothing was exported')
})

t.test('on: a span per request with queue wait, lease and upstream exchange children, exported over OTLP/HTTP', async (t) => {
  const receiver = await startReceiver()
  t.teardown(receiver.close)
  const fleet = await startFleet(t, {
    gpus: [1],
    upstreams: [{ model: 'llama3', gpus: [0], simulator: { models: ['llama3:latest'], tokens: 5 } }],
    options: {
      OTEL_EXPORTER_OTLP_ENDPOINT: receiver.url,
      OTEL_SERVICE_NAME: 'maestro-under-test',
      OTEL_EXPORTER_OTLP_HEADERS: 'x-collector-token=s3cret%20value'
    }
  })
  const gw = await fleet.replica()
  const sim = fleet.upstreams[0]

  // A client that is itself traced: its span is the request span's parent.
  const ollama = new Ollama({ host: gw.url, headers: { traceparent: `00-${CLIENT_TRACE_ID}-${CLIENT_SPAN_ID}-01`, tracestate: 'vendor=abc' } })
  let last: { prompt_eval_count?: number, eval_count?: number } = {}
  for await (const part of await ollama.chat({ model: 'llama3', messages: [{ role: 'user', content: 'hello there' }], stream: true })) last = part
  t.ok((last.eval_count ?? 0) > 0 && (last.prompt_eval_count ?? 0) > 0, 'the final line has counts')
  const chatSeen = sim.requests.at(-1)!

  // A client without a trace: a new trace starts at the gateway.
  const openai = new OpenAI({ baseURL: gw.url + '/v1', apiKey: 'x', maxRetries: 0 })
  const completion = await openai.chat.completions.create({ model: 'llama3', messages: [{ role: 'user', content: 'hi' }] })
  const openaiSeen = sim.requests.at(-1)!

  // Closing the gateway flushes the exporter (onClose).
  await gw.close()
  const received = await eventually(() => receiver.spans.filter((s) => s.kind === 2).length >= 2 && receiver.spans.length >= 8)
  t.ok(received, 'the spans of both requests were received')
  if (!received) return
  t.ok(loadedOtelModules().some((p) => p.includes('/@opentelemetry/sdk-trace-base/')), 'and the module check sees it (so the off test could have failed)')

  t.ok(receiver.requests.every((r) => r.path === '/v1/traces'), 'exported to <endpoint>/v1/traces')
  t.ok(receiver.requests.every((r) => r.contentType?.startsWith('application/json') === true), 'as OTLP/JSON')
  t.equal(receiver.requests[0].headers['x-collector-token'], 's3cret value', 'OTEL_EXPORTER_OTLP_HEADERS sent, URL-decoded')

  // The chat request: continues the client's trace.
  const root = receiver.spans.find((s) => s.kind === 2 && s.attrs['http.route'] === '/api/chat')
  if (root == null) throw new Error('no request span for /api/chat')
  t.equal(root.resource['service.name'], 'maestro-under-test', 'OTEL_SERVICE_NAME names the service')
  t.equal(root.traceId, CLIENT_TRACE_ID, 'the client\'s trace id is continued')
  t.equal(root.parentSpanId, CLIENT_SPAN_ID, 'the client\'s span is the request span\'s parent')
  t.equal(root.name, 'POST /api/chat')
  t.match(root.attrs, {
    'http.request.method': 'POST',
    'http.route': '/api/chat',
    'url.path': '/api/chat',
    'http.response.status_code': 200,
    'gen_ai.operation.name': 'chat',
    'gen_ai.system': 'ollama',
    'gen_ai.request.model': 'llama3',
    'gen_ai.response.model': 'llama3',
    'server.address': '127.0.0.1',
    'server.port': sim.port,
    'gen_ai.usage.input_tokens': last.prompt_eval_count,
    'gen_ai.usage.output_tokens': last.eval_count
  }, 'HTTP and GenAI attributes, the counts of the final line')

  const children = receiver.spans.filter((s) => s.traceId === root.traceId && s.parentSpanId === root.spanId)
  t.same(children.map((s) => s.name).sort(), ['chat llama3', 'lease', 'queue wait'], 'three children: queue wait, lease, upstream exchange')
  const byName = (name: string): typeof root => children.find((s) => s.name === name)!
  const queue = byName('queue wait')
  const lease = byName('lease')
  const exchange = byName('chat llama3')
  t.equal(exchange.kind, 3, 'the upstream exchange is a client span')
  t.match(exchange.attrs, { 'server.address': '127.0.0.1', 'server.port': sim.port, 'http.response.status_code': 200, 'gen_ai.system': 'ollama', 'gen_ai.request.model': 'llama3' })
  t.equal(lease.attrs['maestro.assignment'], 'llama3-1')
  t.equal(lease.attrs['maestro.gpus'], fleet.gpuIds[0])
  t.ok(nanos(root.startTimeUnixNano) <= nanos(queue.startTimeUnixNano), 'the queue wait starts within the request')
  t.equal(nanos(queue.endTimeUnixNano), nanos(lease.startTimeUnixNano), 'the lease starts when the wait ends')
  t.ok(nanos(lease.startTimeUnixNano) <= nanos(exchange.startTimeUnixNano), 'the exchange runs on the lease')
  t.ok(nanos(exchange.endTimeUnixNano) <= nanos(root.endTimeUnixNano), 'the exchange ended before the request did')

  // What the upstream was sent: the exchange span's context, the client's tracestate kept.
  t.equal(chatSeen.headers.traceparent, `00-${CLIENT_TRACE_ID}-${exchange.spanId}-01`, 'the upstream got the exchange span\'s traceparent')
  t.equal(chatSeen.headers.tracestate, 'vendor=abc', 'and the trace\'s tracestate')

  // The OpenAI request: a trace of its own, the operation named by its route.
  const openaiRoot = receiver.spans.find((s) => s.kind === 2 && s.attrs['http.route'] === '/v1/chat/completions')
  if (openaiRoot == null) throw new Error('no request span for /v1/chat/completions')
  t.notOk(openaiRoot.parentSpanId, 'no parent: the client sent no traceparent')
  t.not(openaiRoot.traceId, CLIENT_TRACE_ID, 'a new trace')
  t.match(openaiRoot.attrs, {
    'gen_ai.operation.name': 'chat',
    'gen_ai.usage.input_tokens': completion.usage?.prompt_tokens,
    'gen_ai.usage.output_tokens': completion.usage?.completion_tokens
  })
  const openaiExchange = receiver.spans.find((s) => s.parentSpanId === openaiRoot.spanId && s.kind === 3)
  t.equal(openaiSeen.headers.traceparent, `00-${openaiRoot.traceId}-${openaiExchange?.spanId}-01`, 'its upstream got its exchange span\'s traceparent')
})

t.test('an upstream that cannot be reached: its exchange span failed \'unreachable\', the request span 502', async (t) => {
  const receiver = await startReceiver()
  t.teardown(receiver.close)
  const fleet = await startFleet(t, {
    gpus: [1],
    upstreams: [{ model: 'llama3', gpus: [0], simulator: { models: ['llama3:latest'] } }],
    options: { OTEL_EXPORTER_OTLP_ENDPOINT: receiver.url + '/' }
  })
  const gw = await fleet.replica()
  await fleet.upstreams[0].close()
  const res = await fetch(gw.url + '/api/generate', { method: 'POST', body: JSON.stringify({ model: 'llama3', prompt: 'hi', stream: false }) })
  t.equal(res.status, 502, 'no server could answer')
  await res.arrayBuffer()
  await gw.close()
  t.ok(await eventually(() => receiver.spans.length >= 4), 'the spans were received')
  t.ok(receiver.requests.every((r) => r.path === '/v1/traces'), 'an endpoint with a trailing slash gets no double one')
  const root = receiver.spans.find((s) => s.kind === 2)
  if (root == null) throw new Error('no request span')
  t.equal(root.attrs['http.response.status_code'], 502)
  t.equal(root.status?.code, 2, 'the request span is an error')
  const children = receiver.spans.filter((s) => s.parentSpanId === root.spanId)
  t.same(children.map((s) => s.name).sort(), ['lease', 'queue wait', 'text_completion llama3'])
  const exchange = children.find((s) => s.kind === 3)!
  t.equal(exchange.attrs['error.type'], 'unreachable', 'the exchange span says why it failed')
  t.equal(exchange.status?.code, 2, 'and is an error')
})

t.test('the traces URL is derived from the endpoint as the SDK does', async (t) => {
  t.equal(otlpTracesUrl('http://collector:4318'), 'http://collector:4318/v1/traces')
  t.equal(otlpTracesUrl('http://collector:4318/'), 'http://collector:4318/v1/traces')
  t.equal(otlpTracesUrl('https://otel.example.com/otlp'), 'https://otel.example.com/otlp/v1/traces')
  t.throws(() => otlpTracesUrl('http://'), 'an endpoint that is no URL')
  t.throws(() => resolveConfig({ ...defaults(), OTEL_EXPORTER_OTLP_ENDPOINT: 'http://' }), { name: 'ConfigError', message: /^OTEL_EXPORTER_OTLP_ENDPOINT: / }, 'the start stops naming the variable')
  t.equal(resolveConfig(defaults()).tracing, undefined, 'unset: tracing off')
  t.same(resolveConfig({ ...defaults(), OTEL_EXPORTER_OTLP_ENDPOINT: 'http://c:4318', OTEL_EXPORTER_OTLP_HEADERS: 'a=b' }).tracing,
    { tracesUrl: 'http://c:4318/v1/traces', serviceName: 'ai-maestro-proxy', headers: 'a=b' })
})
