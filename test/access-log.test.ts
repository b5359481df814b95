// One log line per finished request, with the lease and upstream facts (issue 5).
import t from 'tap'
import { Writable } from 'node:stream'
import Fastify, { LogController } from 'fastify'
import { Ollama } from 'ollama'
import maestro from '../app.js'
import { startFleet, type TestFleet } from './helpers/gateway.js'

interface LogLine { level: number, msg: string, reqId?: string, [field: string]: any }

/** A gateway whose logger writes JSON lines into an array, Fastify's own request lines off as in server.ts. */
async function loggedGateway (t: Parameters<typeof startFleet>[0], fleet: TestFleet, level = 'info') {
  const lines: LogLine[] = []
  const stream = new Writable({
    write (chunk, _encoding, done) {
      for (const text of String(chunk).split('\n')) if (text !== '') lines.push(JSON.parse(text))
      done()
    }
  })
  const app = Fastify({ logger: { level, stream }, logController: new LogController({ disableRequestLogging: true }) })
  t.teardown(() => app.close())
  await app.register(maestro, { dotenv: false, ...fleet.options })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const url = `http://127.0.0.1:${(app.server.address() as { port: number }).port}`
  const finished = () => lines.filter((l) => l.msg === 'request finished')
  /** Wait for `count` finished-request lines (they are written when the response closes). */
  const waitFor = async (count: number): Promise<LogLine[]> => {
    const deadline = Date.now() + 5000
    while (finished().length < count && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 20))
    return finished()
  }
  return { url, lines, finished, waitFor }
}

t.test('one line per request with request id, model, assignment, GPUs, queue and upstream times, status and bytes', async (t) => {
  const fleet = await startFleet(t, { gpus: [1], upstreams: [{ model: 'm', gpus: [0], simulator: { models: ['m:latest'] } }] })
  const gw = await loggedGateway(t, fleet)
  const sim = fleet.upstreams[0]

  const res = await fetch(`${gw.url}/api/chat`, {
    method: 'POST',
    headers: { 'x-request-id': 'trace-123' },
    body: JSON.stringify({ model: 'M', messages: [{ role: 'user', content: 'hi' }], stream: false })
  })
  const body = await res.text()
  t.equal(res.status, 200)
  t.equal(res.headers.get('x-request-id'), 'trace-123', 'the client\'s request id is kept')
  t.equal(sim.requests.at(-1)!.headers['x-request-id'], 'trace-123', 'and passed to the upstream')
  const [chat] = await gw.waitFor(1)
  t.match(chat, {
    level: 30,
    requestId: 'trace-123',
    method: 'POST',
    url: '/api/chat',
    route: '/api/chat',
    status: 200,
    model: 'M',
    assignment: 'm-1',
    gpus: fleet.gpuIds[0]
  })
  t.type(chat.queueMs, 'number')
  t.ok(chat.queueMs >= 0)
  t.ok(chat.upstreamMs > 0 && chat.upstreamMs <= chat.ms, `upstream ${chat.upstreamMs} ms within the request's ${chat.ms} ms`)
  t.ok(chat.bytes > Buffer.byteLength(body) && chat.bytes < Buffer.byteLength(body) + 2000, `${chat.bytes} bytes: the body and its headers`)
  t.equal(chat.aborted, undefined)

  // No x-request-id: the gateway makes one, answers with it, sends it upstream and logs it.
  const ollama = new Ollama({ host: gw.url })
  await ollama.generate({ model: 'm', prompt: 'x' })
  const [, generate] = await gw.waitFor(2)
  const made = sim.requests.at(-1)!.headers['x-request-id'] as string
  t.match(made, /^[0-9a-f-]{36}$/)
  t.equal(generate.requestId, made)
  t.equal(generate.route, '/api/generate')

  const missing = await fetch(`${gw.url}/api/chat`, { method: 'POST', body: JSON.stringify({ model: 'nowhere', messages: [] }) })
  await missing.text()
  const [, , notFound] = await gw.waitFor(3)
  t.match(notFound, { status: 404, model: 'nowhere', route: '/api/chat' })
  t.equal(notFound.assignment, undefined, 'no upstream was involved')

  const health = await fetch(`${gw.url}/health/live`)
  await health.text()
  await fetch(`${gw.url}/no/such/route`).then(async (r) => await r.text())
  const all = await gw.waitFor(4)
  t.match(all[3], { status: 404, url: '/no/such/route' }, 'an unknown route has its line too')
  t.equal(all.length, 4, 'the health probe logs at debug only')
  t.equal(gw.lines.filter((l) => l.msg === 'incoming request' || l.msg === 'request completed').length, 0, 'none of Fastify\'s own request lines')
  const ids = all.map((l) => l.reqId)
  t.equal(new Set(ids).size, ids.length, 'one line per request')
})

t.test('a stream the client leaves is logged once, as aborted; probes show at debug', async (t) => {
  const fleet = await startFleet(t, { gpus: [1], upstreams: [{ model: 'm', gpus: [0], simulator: { models: ['m:latest'] } }] })
  fleet.upstreams[0].behaviour = { kind: 'slow-body', afterLines: 1 }
  const gw = await loggedGateway(t, fleet, 'debug')
  const client = new AbortController()
  const res = await fetch(`${gw.url}/api/generate`, { method: 'POST', body: JSON.stringify({ model: 'm', prompt: 'x' }), signal: client.signal })
  const reader = (res.body as ReadableStream<Uint8Array>).getReader()
  await reader.read()
  client.abort()
  const [line] = await gw.waitFor(1)
  t.match(line, { status: 200, aborted: true, assignment: 'm-1', model: 'm' })
  t.type(line.upstreamMs, 'number')
  await fleet.recorder.whenIdle()

  await fetch(`${gw.url}/health/live`).then(async (r) => await r.text())
  const lines = await gw.waitFor(2)
  t.match(lines[1], { level: 20, route: '/health/live', status: 200 }, 'a probe at debug')
  t.equal(lines.length, 2)
})
