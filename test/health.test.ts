// /health, /health/live, /health/ready as the contract words them (issue 5).
import t from 'tap'
import http from 'node:http'
import { setTimeout as sleep } from 'node:timers/promises'
import { startFleet } from './helpers/gateway.js'
import { startEmbeddedGateway, writeInventoryFile } from './helpers/embedded.js'
import { startSimulator } from './helpers/upstream-simulator.js'

async function get (url: string): Promise<{ status: number, body: any }> {
  const res = await fetch(url)
  return { status: res.status, body: await res.json() }
}

t.test('with MariaDB and Redis: ok, live and ready', async (t) => {
  const fleet = await startFleet(t, { gpus: [1], upstreams: [{ model: 'm', gpus: [0] }] })
  const gw = await fleet.replica()
  const health = await get(`${gw.url}/health`)
  t.equal(health.status, 200)
  t.match(health.body, { status: 'ok', mariadb: 'ok', redis: 'ok', inventory: { source: 'mariadb', ok: true }, leases: { store: 'redis', held: 0, waiting: 0 } })
  t.same(await get(`${gw.url}/health/live`), { status: 200, body: { status: 'ok' } })
  t.same(await get(`${gw.url}/health/ready`), { status: 200, body: { status: 'ready' } })
})

t.test('embedded mode: no database, leases in memory, still healthy', async (t) => {
  const sim = await startSimulator({ models: ['m:latest'] })
  t.teardown(() => sim.close())
  const file = await writeInventoryFile(t, [{ name: 'local', model: '*', port: sim.port, gpus: [1] }])
  const gw = await startEmbeddedGateway(t, { INVENTORY_FILE: file })
  const health = await get(`${gw.url}/health`)
  t.equal(health.status, 200)
  t.match(health.body, { status: 'ok', mariadb: 'unused', redis: 'unused', inventory: { source: 'file', ok: true }, leases: { store: 'memory' } })
  t.same(await get(`${gw.url}/health/ready`), { status: 200, body: { status: 'ready' } })
})

t.test('readiness fails while the gateway drains; the stream in flight finishes', async (t) => {
  const fleet = await startFleet(t, { gpus: [1], upstreams: [{ model: 'm', gpus: [0], simulator: { tokens: 30, tokenDelayMs: 50 } }] })
  const gw = await fleet.replica()
  // A stream in flight while the gateway closes; `Connection: close`, as a connection left idle
  // after the close began would hold the close for Fastify's keepAliveTimeout (72 s).
  const stream = new Promise<{ status: number, text: string }>((resolve, reject) => {
    const req = http.request(`${gw.url}/api/generate`, { method: 'POST', agent: false }, (res) => {
      let text = ''
      res.setEncoding('utf8')
      res.on('data', (chunk: string) => { text += chunk })
      res.on('end', () => resolve({ status: res.statusCode ?? 0, text }))
    })
    req.on('error', reject)
    req.end(JSON.stringify({ model: 'm', prompt: 'x' }))
  })
  await sleep(200)
  const closing = gw.close()
  await sleep(50)
  const ready = await fetch(`${gw.url}/health/ready`).then(async (r) => r.status, () => 'refused')
  t.equal(ready, 503, 'not ready while draining (503, not a refused connection)')
  const finished = await stream
  t.equal(finished.status, 200, 'the stream in flight finished')
  t.match(finished.text, /"done":true/)
  await closing
})
