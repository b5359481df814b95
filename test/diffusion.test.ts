// Stable Diffusion through the gateway: images, uploads, and img2img reaching the server that holds the file.
import t from 'tap'
import { assertAllFree, startFleet } from './helpers/gateway.js'
import { makePng, readPng } from './helpers/upstream-simulator.js'

const json = (body: unknown): RequestInit => ({ method: 'POST', body: JSON.stringify(body), headers: { 'content-type': 'application/json' } })

t.test('txt2img streams a PNG back, the body reaching the server unchanged', async (t) => {
  const fleet = await startFleet(t, { gpus: [1], upstreams: [{ model: 'sdxl-turbo', kind: 'diffusor', gpus: [0] }] })
  const gw = await fleet.replica()
  const raw = '{"model":"SDXL-Turbo","prompt":"a lighthouse", "num_inference_steps":4 , "seed":12345678901234567890}'
  const res = await fetch(`${gw.url}/txt2img`, { method: 'POST', body: raw })
  t.equal(res.status, 200)
  t.equal(res.headers.get('content-type'), 'image/png')
  t.equal(res.headers.get('x-maestro-gpus'), fleet.gpuIds[0])
  t.equal(readPng(Buffer.from(await res.arrayBuffer())).width, 8, 'a decodable PNG')
  t.equal(fleet.upstreams[0].requests.at(-1)!.rawBody, raw, 'forwarded byte for byte')
  const missing = await fetch(`${gw.url}/txt2img`, json({ model: 'sdxl-turbo' }))
  t.equal(missing.status, 422, "the server's own validation error passes through")
  t.match(await missing.json(), { detail: [{ type: 'missing', loc: ['body', 'prompt'] }] })
  await assertAllFree(t, gw)
})

t.test('img2img goes to the server that holds the uploaded file, from any replica', async (t) => {
  const fleet = await startFleet(t, {
    gpus: [1, 1],
    upstreams: [
      { model: 'sd', kind: 'diffusor', gpus: [0] },
      { model: 'sd', kind: 'diffusor', gpus: [1] }
    ]
  })
  const replicas = [await fleet.replica(), await fleet.replica()]
  const uploads: string[] = []
  for (let i = 0; i < 4; i++) {
    const form = new FormData()
    form.append('file', new Blob([new Uint8Array(makePng(`source ${i}`))], { type: 'image/png' }), `in-${i}.png`)
    const res = await fetch(`${replicas[i % 2].url}/upload`, { method: 'POST', body: form })
    t.equal(res.status, 200)
    uploads.push(((await res.json()) as { file_id: string }).file_id)
  }
  const holders = uploads.map((id) => fleet.upstreams.findIndex((u) => u.uploads.has(id)))
  t.same([...new Set(holders)].sort(), [0, 1], 'uploads are spread over both servers')
  for (const [i, fileId] of uploads.entries()) {
    for (const gw of replicas) {
      const res = await fetch(`${gw.url}/img2img`, json({ model: 'sd', prompt: `variation ${i}`, file_id: fileId, strength: 0.5 }))
      t.equal(res.status, 200, `file ${i} found through ${gw.url}`)
      t.equal(readPng(Buffer.from(await res.arrayBuffer())).width, 8)
    }
  }
  const unknown = await fetch(`${replicas[0].url}/img2img`, json({ model: 'sd', prompt: 'x', file_id: 'no-such-file' }))
  t.equal(unknown.status, 404)
  t.same(await unknown.json(), { detail: 'File not found' }, "an unknown file is the server's 404")
  await fleet.recorder.whenIdle()
  t.same(fleet.recorder.overlaps, [])
  await assertAllFree(t, replicas[0])
})
