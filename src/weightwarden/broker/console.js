// weightwarden console: passkey enrolment, sign-in, approvals and audit proof checks.
// Loaded as a file (the page's Content-Security-Policy forbids inline script and handlers).
async function post(url, body) {
  const r = await fetch(url, {
    method: "POST",
    headers: {"content-type": "application/json", "x-warden-console": "1"},
    body: JSON.stringify(body),
  });
  const j = await r.json();
  if (!r.ok) { throw new Error(j.error || String(r.status)); }
  return j;
}

function show(msg) { document.getElementById("status").textContent = msg; }

const field = (id) => document.getElementById(id).value;
const creationOptions = (o) => ({publicKey: PublicKeyCredential.parseCreationOptionsFromJSON(o.options)});
const requestOptions = (o) => ({publicKey: PublicKeyCredential.parseRequestOptionsFromJSON(o.options)});

async function enroll() {
  try {
    const o = await post("/console/api/enroll/options", {account: field("account"), code: field("code")});
    const cred = await navigator.credentials.create(creationOptions(o));
    await post("/console/api/enroll/finish", {challenge_id: o.challenge_id, credential: cred.toJSON()});
    show("passkey registered: sign in");
  } catch (e) { show("enrolment failed: " + e.message); }
}

async function login() {
  try {
    const o = await post("/console/api/login/options", {account: field("account")});
    const cred = await navigator.credentials.get(requestOptions(o));
    await post("/console/api/login/finish", {challenge_id: o.challenge_id, credential: cred.toJSON()});
    window.location = "/console";
  } catch (e) { show("sign-in failed: " + e.message); }
}

async function approve(rid) {
  try {
    const base = "/console/api/requests/" + rid + "/approve/";
    const o = await post(base + "options", {});
    const cred = await navigator.credentials.get(requestOptions(o));
    const r = await post(base + "finish", {challenge_id: o.challenge_id, credential: cred.toJSON()});
    show("approved: request is " + r.status);
    document.getElementById("req-" + rid).setAttribute("data-status", r.status);
  } catch (e) { show("approval failed: " + e.message); }
}

async function checkProof(i) {
  const out = document.getElementById("proof-" + i);
  try {
    const r = await post("/console/api/audit/" + i + "/check", {});
    out.textContent = r.ok ? "verified under the signed head of " + r.head_size : "FAILED";
  } catch (e) { out.textContent = "FAILED: " + e.message; }
}

document.addEventListener("DOMContentLoaded", () => {
  const on = (id, fn) => { const b = document.getElementById(id); if (b) { b.addEventListener("click", fn); } };
  on("login", login);
  on("enroll", enroll);
  document.querySelectorAll("button.approve").forEach((b) => b.addEventListener("click", () => approve(b.dataset.rid)));
  document.querySelectorAll("button.proof").forEach((b) => b.addEventListener("click", () => checkProof(b.dataset.index)));
  document.body.setAttribute("data-ready", "1");
});
