// The OpenAPI document (GET /docs/json) and the browsable /docs: generated from the routes by
// @fastify/swagger, OpenAPI 3, every route listed (the proxied ones too), under the prefix the
// gateway is embedded at, open to read even when keys are required.
import t, { type Test } from 'tap'
import Fastify, { type FastifyInstance } from 'fastify'
import maestro from '../app.js'
import { SERVICE_VARIABLES, writeInventoryFile } from './helpers/embedded.js'

/** A host app with the gateway under `prefix`, recording every route the gateway registers. */
async function hostApp (t: Test, prefix: string, options: Record<string, unknown> = {}): Promise<{ app: FastifyInstance, url: string, routes: Array<{ method: string, url: string }> }> {
  const file = await writeInventoryFile(t, [{ name: 'ollama', model: 'llama3', port: 9, gpus: [1] }])
  const routes: Array<{ method: string, url: string }> = []
  const app = Fastify({ forceCloseConnections: true })
  app.addHook('onRoute', (route) => {
    for (const method of [route.method].flat()) routes.push({ method, url: route.url })
  })
  const saved = SERVICE_VARIABLES.map((v) => [v, process.env[v]] as const)
  for (const v of SERVICE_VARIABLES) delete process.env[v]
  try {
    await app.register(maestro, { prefix, dotenv: false, INVENTORY_FILE: file, ...options } as any)
    await app.listen({ port: 0, host: '127.0.0.1' })
  } finally {
    for (const [v, value] of saved) if (value !== undefined) process.env[v] = value
  }
  t.teardown(async () => { await app.close() })
  const address = app.server.address()
  const port = typeof address === 'object' && address != null ? address.port : 0
  return { app, url: `http://127.0.0.1:${port}`, routes }
}

/**
 * `/admin/gpus/:id` → `/admin/gpus/{id}` and `/v1/models/*` → `/v1/models/{*}`, as OpenAPI writes
 * paths; no trailing slash (the prefix's root is registered both as `/maestro` and `/maestro/`).
 */
const openApiPath = (url: string): string =>
  url.replace(/:([A-Za-z0-9_]+)/g, '{$1}').replace(/\/\*$/, '/{*}').replace(/(.)\/$/, '$1')

for (const prefix of ['', '/maestro']) {
  t.test(`GET ${prefix}/docs/json lists every route${prefix === '' ? '' : ' under the prefix'}`, async t => {
    const { url, routes } = await hostApp(t, prefix, { API_KEYS: 'client-key', ADMIN_TOKEN: 'admin-token' })
    const res = await fetch(`${url}${prefix}/docs/json`)
    t.equal(res.status, 200, 'open to read with API_KEYS and ADMIN_TOKEN set')
    const doc = await res.json() as { openapi: string, paths: Record<string, Record<string, any>>, info: { title: string } }
    t.match(doc.openapi, /^3\.\d+\.\d+$/, 'OpenAPI 3')
    t.equal(doc.info.title, 'AI Maestro Proxy')

    const expected = routes
      .filter((r) => r.method !== 'HEAD' && !r.url.startsWith(`${prefix}/docs`))
      .map((r) => `${r.method.toLowerCase()} ${openApiPath(r.url)}`)
    t.ok(expected.length > 40, `the gateway registered ${expected.length} routes`)
    const listed = new Set(Object.entries(doc.paths).flatMap(([path, ops]) => Object.keys(ops).map((m) => `${m} ${openApiPath(path)}`)))
    t.same(expected.filter((r) => !listed.has(r)), [], 'no route is missing from the document')
    for (const proxied of ['post /api/chat', 'post /api/generate', 'post /api/embed', 'post /v1/chat/completions', 'post /gpu/reserve',
      'post /admin/assignments/{id}/drain', 'delete /admin/models/{kind}/{name}']) {
      t.ok(listed.has(proxied.replace(' /', ` ${prefix}/`)), `${proxied} listed`)
    }
    t.notOk([...listed].some((r) => r.includes('/docs')), 'the docs routes themselves are not listed')

    // Generated from the routes' own schemas.
    const create = doc.paths[`${prefix}/admin/assignments`].post
    const body = create.requestBody.content['application/json'].schema
    t.same(body.required, ['name', 'model', 'port', 'gpuIds'])
    t.equal(body.properties.maxParallel.minimum, 1)
    t.ok(create.responses['201'] != null && create.responses['409'] != null, 'its answers, 409 included')
    t.equal(doc.paths[`${prefix}/api/chat`].post.requestBody.content['application/json'].schema.properties.model.type, 'string')
  })
}

t.test('/docs is a page served from the package, reading the document under the prefix', async t => {
  const { url } = await hostApp(t, '/maestro', { API_KEYS: 'client-key' })
  const page = await fetch(`${url}/maestro/docs/`)
  t.equal(page.status, 200)
  t.match(page.headers.get('content-type'), /text\/html/)
  const html = await page.text()
  t.notMatch(html, /https?:\/\/(?!127\.0\.0\.1)[a-z]/i, 'no other host named (no CDN)')
  const scripts = [...html.matchAll(/src="([^"]+)"/g)].map((m) => m[1])
  t.ok(scripts.length > 0)
  for (const src of scripts) {
    const asset = await fetch(new URL(src, `${url}/maestro/docs/`))
    t.equal(asset.status, 200, `${src} served by the gateway`)
    await asset.arrayBuffer()
  }
  const initializer = await (await fetch(`${url}/maestro/docs/static/swagger-initializer.js`)).text()
  t.match(initializer, /json/, 'the page loads the document')
  t.equal((await fetch(`${url}/docs/json`)).status, 404, 'nothing outside the prefix')
})
