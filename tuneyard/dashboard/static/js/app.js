// The dashboard's entry: sign-in, hash routes (#/jobs, #/jobs/<id>, #/new, #/compare/<ids>), one view at a time.
import { key, verify } from "./api.js";
import { h, clear } from "./dom.js";
import * as jobs from "./jobs.js";
import * as job from "./job.js";
import * as newjob from "./newjob.js";
import * as compare from "./compare.js";

const view = document.getElementById("view");
const signin = document.getElementById("signin");
const nav = document.getElementById("nav");
const signout = document.getElementById("signout");
let leave = () => {};

const ROUTES = [
  [/^#\/jobs\/(.+)$/, (m) => job.render(view, decodeURIComponent(m[1])), "#/jobs"],
  [/^#\/new$/, () => newjob.render(view), "#/new"],
  [/^#\/compare(?:\/(.*))?$/, (m) => compare.render(view, m[1]), "#/compare"],
  [/^.*$/, () => jobs.render(view), "#/jobs"],
];

async function route() {
  leave();
  leave = () => {};
  if (!key.get()) {
    showSignin();
    return;
  }
  signin.hidden = true;
  nav.hidden = false;
  signout.hidden = false;
  const hash = location.hash || "#/jobs";
  for (const [re, render, tab] of ROUTES) {
    const m = hash.match(re);
    if (!m) continue;
    for (const a of nav.querySelectorAll("a")) {
      if (a.getAttribute("href") === tab) a.setAttribute("aria-current", "page");
      else a.removeAttribute("aria-current");
    }
    try {
      leave = (await render(m)) || (() => {});
    } catch (e) {
      clear(view, h("p", { class: "error", role: "alert" }, e.message));
    }
    document.getElementById("main").focus({ preventScroll: true });
    return;
  }
}

function showSignin(message = "") {
  clear(view);
  nav.hidden = true;
  signout.hidden = true;
  signin.hidden = false;
  document.getElementById("signin-error").textContent = message;
  document.getElementById("apikey").focus();
}

document.getElementById("signin-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const input = document.getElementById("apikey");
  const token = input.value.trim();
  if (!token) {
    document.getElementById("signin-error").textContent = "Enter an API key.";
    return;
  }
  try {
    await verify(token);
  } catch (e) {
    document.getElementById("signin-error").textContent = e.message;
    input.setAttribute("aria-invalid", "true");
    return;
  }
  input.value = "";
  input.removeAttribute("aria-invalid");
  key.set(token);
  route();
});

signout.addEventListener("click", () => {
  leave();
  leave = () => {};
  key.clear();
  showSignin();
});

window.addEventListener("tuneyard:unauthorized", () => {
  leave();
  leave = () => {};
  key.clear();
  showSignin("The API key was refused (revoked or expired): sign in again.");
});
window.addEventListener("hashchange", route);
route();
