// /metrics: Prometheus text whose counters, histograms and gauges follow what the gateway did (issue 5).
import t from 'tap'
import { setTimeout as sleep } from 'node:timers/promises'
import { Redis } from 'ioredis'
import { Ollama } from 'ollama'
import { startFleet } from './helpers/gateway.js'
import { scrape, type Exposition } from './helpers/prometheus.js'
import { REDIS_URL } from './helpers/redis.js'

/** Scrape until `ready` holds (the lease store and the release path are asynchronous). */
async function scrapeUntil (url: string, ready: (m: Exposition) => boolean, timeoutMs = 5000): Promise<Exposition> {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const m = await scrape(url)
    if (ready(m) || Date.now() > deadline) return m
    await sleep(50)
  }
}

t.test('counters and histograms move by what a handful of requests did', async (t) => {
  const fleet = await startFleet(t, {
    // GPU 1 outweighs GPU 0, so m-2 (whose server is down) is tried first.
    gpus: [1, 5, 1],
    upstreams: [
      { model: 'm', gpus: [0], simulator: { models: ['m:latest'] } },
      { model: 'm', gpus: [1], simulator: { models: ['m:latest'] } },
      { model: 'd', gpus: [2], simulator: { models: ['d:latest'] } }
    ]
  })
  await fleet.upstreams[1].close()
  fleet.upstreams[2].behaviour = { kind: 'die-mid-stream', afterLines: 2 }
  const gw = await fleet.replica()
  const before = await scrape(gw.url)
  t.equal(before.value('maestro_gpus'), 3, 'every GPU of the inventory')
  t.equal(before.value('maestro_gpus_leased'), 0)
  t.equal(before.value('maestro_lease_store_up'), 1)
  t.ok(before.types.get('maestro_process_cpu_user_seconds_total') === 'counter', 'default process metrics, prefixed')
  t.equal(before.types.get('maestro_http_request_duration_seconds'), 'histogram')
  t.equal(before.types.get('maestro_lease_wait_seconds'), 'histogram')

  const ollama = new Ollama({ host: gw.url })
  for (let i = 0; i < 3; i++) {
    const chat = await ollama.chat({ model: 'M:latest', messages: [{ role: 'user', content: `hi ${i}` }] })
    t.equal(chat.done, true)
  }
  for await (const part of await ollama.generate({ model: 'm', prompt: 'x', stream: true })) void part
  const missing = await fetch(`${gw.url}/api/chat`, { method: 'POST', body: JSON.stringify({ model: 'nowhere', messages: [] }) })
  t.equal(missing.status, 404)
  await missing.text()
  const broken = await fetch(`${gw.url}/api/generate`, { method: 'POST', body: JSON.stringify({ model: 'd', prompt: 'x' }) })
  const brokenLines = (await broken.text()).trim().split('\n')
  t.match(brokenLines.at(-1), /"error"/, 'the broken stream ends with an error line')
  await fleet.recorder.whenIdle()

  const after = await scrapeUntil(gw.url, (m) => m.value('maestro_lease_releases_total', { kind: 'llm' }) >= 6)
  const delta = (name: string, labels: Record<string, string> = {}): number => after.value(name, labels) - before.value(name, labels)

  t.equal(delta('maestro_http_requests_total', { route: '/api/chat', model: 'm', status: '200' }), 3, 'three chats, model label by model key')
  t.equal(delta('maestro_http_requests_total', { route: '/api/generate', model: 'm', status: '200' }), 1)
  t.equal(delta('maestro_http_requests_total', { route: '/api/chat', model: '', status: '404' }), 1, 'an unknown model carries no model label')
  t.equal(delta('maestro_http_requests_total', { route: '/api/generate', model: 'd', status: '200' }), 1, 'a stream that broke after its headers keeps its status')
  t.ok(delta('maestro_http_requests_total', { route: '/metrics', model: '', status: '200' }) >= 1, 'the scrapes themselves')

  const chat = { route: '/api/chat', model: 'm', status: '200' }
  t.equal(delta('maestro_http_request_duration_seconds_count', chat), 3)
  t.ok(delta('maestro_http_request_duration_seconds_sum', chat) > 0)
  t.equal(after.value('maestro_http_request_duration_seconds_bucket', { ...chat, le: '+Inf' }), 3)
  const buckets = after.find('maestro_http_request_duration_seconds_bucket', chat).map((s) => s.value)
  t.same(buckets, [...buckets].sort((a, b) => a - b), 'cumulative buckets never decrease')

  // Leases: 3 chats (the first leased m-2, found it down, released it, leased m-1) + 1 generate + 1 broken stream.
  t.equal(delta('maestro_lease_grants_total', { kind: 'llm', purpose: 'proxy' }), 6)
  t.equal(delta('maestro_lease_releases_total', { kind: 'llm' }), 6)
  t.equal(delta('maestro_lease_expiries_total', { kind: 'llm' }), 0)
  t.equal(delta('maestro_lease_wait_seconds_count', { kind: 'llm', model: 'm' }), 5)
  t.equal(delta('maestro_lease_wait_seconds_count', { kind: 'llm', model: 'd' }), 1)
  t.equal(delta('maestro_upstream_errors_total', { assignment: 'm-2', reason: 'unreachable' }), 1, 'the server that was down')
  t.equal(delta('maestro_upstream_errors_total', { assignment: 'd-3', reason: 'mid-stream' }), 1, 'the stream that broke')
  t.equal(after.find('maestro_upstream_errors_total').length, 2, 'no other upstream errors')
  t.equal(after.value('maestro_gpus_leased'), 0, 'every lease released')
})

t.test('queue depth and leased GPUs are read from the lease store at scrape time; a lost lease counts as an expiry', async (t) => {
  const fleet = await startFleet(t, {
    gpus: [1],
    upstreams: [{ model: 'q', gpus: [0], simulator: { models: ['q:latest'] } }],
    options: { LEASE_TTL_MS: 900 }
  })
  fleet.upstreams[0].behaviour = { kind: 'slow-body', afterLines: 1 }
  const gw = await fleet.replica()
  const other = await fleet.replica()
  const clients = [new AbortController(), new AbortController(), new AbortController()]
  // Teardowns run last first: this one before the gateways close (closing waits for their requests).
  t.teardown(() => { for (const c of clients) c.abort() })
  const send = (gateway: string, c: AbortController): Promise<unknown> =>
    fetch(`${gateway}/api/generate`, { method: 'POST', body: JSON.stringify({ model: 'q', prompt: 'x' }), signal: c.signal })
      .then(async (res) => await res.text()).catch(() => undefined)
  const pending = [send(gw.url, clients[0])]
  await scrapeUntil(gw.url, (m) => m.value('maestro_gpus_leased') === 1)
  pending.push(send(gw.url, clients[1]), send(other.url, clients[2]))
  const busy = await scrapeUntil(gw.url, (m) => m.value('maestro_queue_depth', { kind: 'llm', model: 'q' }) === 2)
  t.equal(busy.value('maestro_gpus_leased'), 1, 'one GPU leased')
  t.equal(busy.value('maestro_queue_depth', { kind: 'llm', model: 'q' }), 2, 'two waiting, across both replicas')

  // Someone else takes the GPU: the holder's next renewal finds its lease lost.
  const redis = new Redis(REDIS_URL)
  t.teardown(() => redis.disconnect())
  // (the lease store's layout: the GPU now runs another assignment, which holds a live slot)
  await redis.zadd(`${fleet.prefix}slots:intruder`, Date.now() + 60000, 'intruder|1#1')
  await redis.set(`${fleet.prefix}gpu:${fleet.gpuIds[0]}`, 'intruder', 'PX', 60000)
  const lost = await scrapeUntil(gw.url, (m) => m.value('maestro_lease_expiries_total', { kind: 'llm' }) === 1)
  t.equal(lost.value('maestro_lease_expiries_total', { kind: 'llm' }), 1, 'the lost lease counted once')

  for (const c of clients) c.abort()
  await Promise.all(pending)
  const left = await scrapeUntil(gw.url, (m) => m.value('maestro_http_requests_total', { route: '/api/generate', model: 'q', status: '499' }) === 1)
  t.equal(left.value('maestro_http_requests_total', { route: '/api/generate', model: 'q', status: '499' }), 1, 'the waiter whose client left counts as 499')
  t.equal(left.value('maestro_http_requests_total', { route: '/api/generate', model: 'q', status: '200' }), 1, 'the aborted stream keeps the status it sent')
  await redis.del(`${fleet.prefix}gpu:${fleet.gpuIds[0]}`)
  const idle = await scrapeUntil(gw.url, (m) => m.value('maestro_queue_depth', { kind: 'llm', model: 'q' }) === 0 && m.value('maestro_gpus_leased') === 0)
  t.equal(idle.value('maestro_queue_depth', { kind: 'llm', model: 'q' }), 0, 'the queue emptied')
  t.equal(idle.value('maestro_gpus_leased'), 0)
})

t.test('two gateways in one process keep separate metrics', async (t) => {
  const fleet = await startFleet(t, { gpus: [1], upstreams: [{ model: 'm', gpus: [0] }] })
  const a = await fleet.replica()
  const b = await fleet.replica()
  await new Ollama({ host: a.url }).chat({ model: 'm', messages: [{ role: 'user', content: 'hi' }] })
  const ma = await scrape(a.url)
  const mb = await scrape(b.url)
  t.equal(ma.value('maestro_http_requests_total', { route: '/api/chat', model: 'm', status: '200' }), 1)
  t.equal(mb.value('maestro_http_requests_total', { route: '/api/chat', model: 'm', status: '200' }), 0)
  t.ok(mb.types.has('maestro_process_resident_memory_bytes'), 'both expose the process metrics')
})

t.test('/metrics stays open when API keys guard the proxied routes', async (t) => {
  const fleet = await startFleet(t, { gpus: [1], upstreams: [{ model: 'm', gpus: [0] }] })
  const gw = await fleet.replica({ API_KEYS: 'secret-key' })
  const chat = await fetch(`${gw.url}/api/chat`, { method: 'POST', body: JSON.stringify({ model: 'm', messages: [] }) })
  t.equal(chat.status, 401)
  await chat.text()
  const m = await scrape(gw.url)
  t.equal(m.value('maestro_http_requests_total', { route: '/api/chat', model: '', status: '401' }), 1, 'the refused request is counted')
})
