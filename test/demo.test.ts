// npm run demo: the embedded gateway with simulated upstreams answers the lines it prints (issue 5).
import t from 'tap'
import { Ollama } from 'ollama'
import { DEMO_DIFFUSOR, DEMO_LLM, startDemo, tryLines } from '../scripts/demo.js'
import { readPng } from './helpers/upstream-simulator.js'
import { parsePrometheus } from './helpers/prometheus.js'
import { openFleetStream } from './helpers/fleet-stream.js'

t.test('the demo streams a chat, makes an image and reports GPUs and metrics', async (t) => {
  const demo = await startDemo({ port: 0 })
  t.teardown(() => demo.close())
  t.match(tryLines(demo.url), new RegExp(`curl -N ${demo.url}/api/chat`))

  const started = performance.now()
  const arrivals: number[] = []
  for await (const part of await new Ollama({ host: demo.url }).chat({ model: DEMO_LLM, messages: [{ role: 'user', content: 'hi' }], stream: true })) {
    arrivals.push(performance.now() - started)
    void part
  }
  t.ok(arrivals.length > 10, `${arrivals.length} parts`)
  t.ok(arrivals.at(-1)! - arrivals[0] > 1000, 'spread over time, as a person watching would see them')

  const image = await fetch(`${demo.url}/txt2img`, { method: 'POST', body: JSON.stringify({ model: DEMO_DIFFUSOR, prompt: 'a lighthouse' }) })
  t.equal(image.status, 200)
  t.equal(image.headers.get('content-type'), 'image/png')
  t.ok(readPng(Buffer.from(await image.arrayBuffer())).width > 0, 'a valid PNG')

  const status = await fetch(`${demo.url}/gpu/status`)
  t.equal(status.status, 200)
  await status.text()
  const metrics = parsePrometheus(await (await fetch(`${demo.url}/metrics`)).text())
  t.equal(metrics.value('maestro_http_requests_total', { route: '/api/chat', model: DEMO_LLM, status: '200' }), 1)
  t.equal(metrics.value('maestro_http_requests_total', { route: '/txt2img', model: DEMO_DIFFUSOR, status: '200' }), 1)

  // the console it names: its page, and its feed showing the demo's fleet
  t.ok(tryLines(demo.url).split('\n').includes(`  ${demo.url}/ui/`), 'the lines name the console')
  const page = await fetch(`${demo.url}/ui/`)
  t.equal(page.status, 200, 'the console answers')
  t.match(page.headers.get('content-type'), /^text\/html/)
  await page.text()
  const feed = await openFleetStream(demo.url)
  try {
    const fleet = await feed.until((f) => f.gpus.length === 2, 3000, 'the console\'s feed to show the demo\'s two GPUs')
    t.same(fleet.gpus.map((g) => g.name).sort(), ['simulated GPU 1', 'simulated GPU 2'], 'its feed shows the demo\'s GPUs')
  } finally {
    feed.close()
  }
})
